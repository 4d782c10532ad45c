"""Utilisation of a run (MoE-CAP's MBU and MFU): the work it had to do against the device's peaks.

    MBU = bytes read from SRAM / (predicted time x aggregate SRAM read bandwidth)
    MFU = FLOPs / (predicted time x peak FLOPs)

The peaks are the ``DeviceSpec``'s (``sram_bandwidth``, ``peak_flops``). What counts as a
phase's work is its caller's: ``llm.utilisation`` for a model's decode and prefill.
"""

from __future__ import annotations

from dataclasses import dataclass

from .device import DeviceSpec


@dataclass(frozen=True)
class Work:
    """What a phase must do: bytes read from memory and FLOPs."""

    bytes: float = 0.0
    flops: float = 0.0

    def __add__(self, other: Work) -> Work:
        return Work(self.bytes + other.bytes, self.flops + other.flops)


def utilisation(work: Work, seconds: float, device: DeviceSpec, dtype: str, cores_used: int) -> dict[str, float]:
    """MBU and MFU of ``work`` done in ``seconds`` of predicted device time, for the device and its used cores."""
    if seconds <= 0:
        return {}
    out = {"bytes": work.bytes, "flops": work.flops, "achieved_bytes_per_s": work.bytes / seconds,
           "achieved_flops": work.flops / seconds}
    for suffix, cores in (("", None), ("_cores_used", cores_used)):
        out["mbu" + suffix] = work.bytes / (seconds * device.sram_bandwidth(cores))
        out["mfu" + suffix] = work.flops / (seconds * device.peak_flops(dtype, cores))
    return out
