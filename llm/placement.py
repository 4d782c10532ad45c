"""Where a model goes on the wafer: padded sizes, per-core bytes, regions and KV capacity.

Everything here is host-side arithmetic, done before any tile starts, so a model that does
not fit is refused with the numbers instead of failing halfway through loading.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from wafer_actors.device import DeviceSpec
from wafer_actors.errors import InputError
from wafer_actors.layout import Spec
from wafer_actors.mesh import even_bounds

from .checkpoint import LlamaWeights
from .config import LlamaConfig
from .prefill_protocol import head_chunks

F32 = 4  # full numerics hold float32 weights, activations and KV entries


class PlacementError(InputError, ValueError):
    """The model cannot be placed as asked: the message gives bytes needed and available."""


def _up(n: int, m: int) -> int:
    return -(-n // m) * m


@dataclass(frozen=True)
class RegionShape:
    """Padded sizes and per-core block sizes of a model on an ``height x width`` region."""

    height: int
    width: int
    dim: int  # D, multiple of height
    kv: int  # KV, multiple of 2 * width
    ffn: int  # F, multiple of width
    vocab: int  # V, multiple of width

    @classmethod
    def of(cls, cfg: LlamaConfig, height: int, width: int) -> "RegionShape":
        return cls(height, width, _up(cfg.dim, height), _up(cfg.kv_dim, 2 * width), _up(cfg.ffn_dim, width), _up(cfg.vocab_size, width))

    @property
    def dt(self) -> int:
        return self.dim // self.height

    @property
    def kvt(self) -> int:
        return self.kv // self.width

    @property
    def ft(self) -> int:
        return self.ffn // self.width

    @property
    def vt(self) -> int:
        return self.vocab // self.width


def layer_bytes(cfg: LlamaConfig, s: RegionShape, elem: int = F32) -> int:
    """Weight bytes of one decoder layer on one core."""
    g = cfg.n_heads // cfg.n_kv_heads
    bias = (g + 2) * s.kvt if cfg.qkv_bias else 0
    return elem * (2 * s.dt + s.dt * (g + 2) * s.kvt + g * s.kvt * s.dt + s.dt * 2 * s.ft + s.ft * s.dt + bias)


def work_bytes(cfg: LlamaConfig, s: RegionShape, head: bool, elem: int = F32) -> int:
    """Activation buffers of one core (x, h, y, qkv, o, ff, z, softmax scalars, KV hand-over), plus the LM head."""
    g = cfg.n_heads // cfg.n_kv_heads
    n = 3 * s.dt + 1 + (g + 2) * s.kvt + g * s.kvt + 3 * s.ft + 2 * cfg.n_kv_heads * g + 4 * s.kvt
    if head:
        n += s.dt + s.dt * s.vt + s.vt
    return elem * n


def slot_bytes(cfg: LlamaConfig, s: RegionShape, layers: int, elem: int = F32) -> int:
    """Bytes one KV slot (one token, all of the region's layers, K and V) costs a core, plus its score."""
    return elem * (2 * layers * s.kvt + cfg.n_heads)


def prefill_bytes(cfg: LlamaConfig, s: RegionShape, layers: int, head: bool, tokens: int, elem: int = F32) -> int:
    """Peak bytes one core needs on top of decode's buffers to prefill ``tokens`` tokens (0: none).

    The largest of the three phases (``llm.prefill_protocol``): the weight re-layout (one
    layer's blocks double-buffered), prefill itself (residual, K/V for the hand-over, work
    buffers and the largest pair of second buffers of any GEMM or skew), and the KV hand-over.
    """
    if tokens <= 0:
        return 0
    if s.height != s.width:
        raise PlacementError(f"prefill on the wafer needs a square region (P x P cores), got {s.height}x{s.width}")
    g, nkv = cfg.n_heads // cfg.n_kv_heads, cfg.n_kv_heads
    st = -(-tokens // s.height)
    dt, kvt, ft, vt = s.dt, s.kvt, s.ft, s.vt
    relayout = layer_bytes(cfg, s, elem) // elem
    head_cols = max(b - a for a, b in head_chunks(dt, vt, 2 * ft))  # the LM head moves in column chunks
    if head:
        relayout = max(relayout, dt * head_cols)
    kv_p = st * layers * 2 * kvt
    scores = st * g * nkv * st
    work = 2 * st * dt + st + st * (g + 2) * kvt + 2 * st * kvt + scores + 2 * st * g * nkv + st * g * kvt + 3 * st * ft
    twins = max(st * dt + dt * (g + 2) * kvt, 2 * st * kvt, st * kvt + scores, g * kvt * dt + st * dt,
                st * dt + dt * 2 * ft, ft * dt + st * dt, st * dt + dt * head_cols if head else 0)
    logits = st * vt if head else 0
    during = st * dt + kv_p + logits + work + twins  # xp, kv_p, logits_p, the work buffers, the GEMM in flight
    handover = kv_p + 2 * layers * 2 * kvt
    return elem * max(relayout, during, handover)


@dataclass(frozen=True)
class RegionShare:
    """The share of the model one region holds: which layers it runs and how many KV slots each of its cores has."""

    index: int
    first_layer: int
    layers: int
    head: bool
    cap: int
    bytes_fixed: int  # per core: weights and activations
    bytes_slot: int  # per core: one KV slot
    bytes_prefill: int = 0  # per core: the most a prefill of the planned prompt adds


@dataclass(frozen=True)
class Placement:
    """A model on one or more ``height x width`` regions of the device."""

    cfg: LlamaConfig
    shape: RegionShape
    regions: tuple[RegionShare, ...]
    kv_mode: str
    prefill_tokens: int = 0  # longest prompt the cores keep room to prefill

    def check_prefill(self, tokens: int) -> None:
        """Refuse a prompt longer than the prefill room the placement kept."""
        if tokens > self.prefill_tokens:
            s = self.shape
            raise PlacementError(
                f"a {tokens}-token prompt is too long to prefill on this {s.height}x{s.width} region: the cores kept room "
                f"for {self.prefill_tokens} tokens ({-(-self.prefill_tokens // s.height)} per row); place the model with "
                f"prefill_tokens >= {tokens} (a larger --mesh if that does not fit), or use --prefill token"
            )

    @property
    def cores(self) -> int:
        """Cores the model occupies: every region's."""
        return len(self.regions) * self.shape.height * self.shape.width

    @property
    def cap(self) -> int:
        """KV slots per core (the smallest over the regions)."""
        return min(r.cap for r in self.regions)

    def capacity(self) -> int:
        """Tokens the KV cache holds: every row's slots (shift) or the tail row's only (concat)."""
        return self.cap * (self.shape.height if self.kv_mode == "shift" else 1)

    def check_tokens(self, tokens: int) -> None:
        """Refuse a sequence of ``tokens`` tokens that the KV cache or the model context cannot hold."""
        if tokens > self.cfg.max_seq_len:
            raise PlacementError(f"{tokens} tokens exceed the model's context of {self.cfg.max_seq_len} tokens")
        if tokens <= self.capacity():
            return
        s = self.shape
        if self.kv_mode == "concat":
            raise PlacementError(
                f"KV cache full: with --kv concat every entry stays in row {s.height - 1} (the tail row) of each "
                f"{s.height}x{s.width} region, whose cores have room for {self.cap} tokens "
                f"({self.regions[0].bytes_slot} bytes each); {tokens} tokens needed. "
                f"--kv shift spreads them over all {s.height} rows and fits {self.cap * s.height}"
            )
        raise PlacementError(
            f"KV cache full: each of the {s.height} rows of a {s.height}x{s.width} region holds {self.cap} tokens, "
            f"{self.capacity()} in all; {tokens} tokens needed. Use a larger --mesh"
        )


def place(cfg: LlamaConfig, device: DeviceSpec, height: int, width: int, *, kv_mode: str = "shift",
          tokens: int = 1, regions: int = 1, max_slots: int | None = None, elem_bytes: int = F32,
          head: bool = True, prefill_tokens: int = 0) -> Placement:
    """Assign the model's layers to as few ``height x width`` regions as hold them with room for ``tokens``.

    Args:
        tokens: KV entries the cache must hold (per row: ceil(tokens / height) with shift).
        regions: use at least this many regions (fewer layers each leaves more room for KV).
        max_slots: allocate at most this many KV slots per core (default: all that fit).
        elem_bytes: bytes per element (4: float32 as full numerics runs; 2: the paper's float16).
        head: the last region also holds the final norm and the LM head.
        prefill_tokens: keep room on every core to prefill a prompt this long on the wafer
            (its transient buffers), at the cost of KV slots.

    Raises:
        PlacementError: the region is larger than the device, or even one layer per region
            does not fit, or the model needs more regions than the device has.
    """
    device.check_mesh(height, width)
    if tokens > cfg.max_seq_len:
        raise PlacementError(f"{tokens} tokens exceed the model's context of {cfg.max_seq_len} tokens")
    s = RegionShape.of(cfg, height, width)
    need = math.ceil(tokens / height) if kv_mode == "shift" else tokens
    available = (device.height // height) * (device.width // width)
    budget = device.sram_bytes
    if not isinstance(regions, int) or not 1 <= regions <= cfg.n_layers:
        raise PlacementError(f"regions must be an integer in [1, {cfg.n_layers}] (one layer per region at most), got {regions!r}")
    for n in range(regions, cfg.n_layers + 1):
        bounds = even_bounds(cfg.n_layers, n)
        regions, ok = [], True
        for i in range(n):
            layers, last = bounds[i + 1] - bounds[i], head and i == n - 1
            fixed = layers * layer_bytes(cfg, s, elem_bytes) + work_bytes(cfg, s, last, elem_bytes)
            slot = slot_bytes(cfg, s, layers, elem_bytes)
            transient = prefill_bytes(cfg, s, layers, last, prefill_tokens, elem_bytes)
            cap = (budget - fixed - transient) // slot
            if cap < need:
                ok = False
                break
            regions.append(RegionShare(i, bounds[i], layers, last, int(min(cap, max_slots or cap)), fixed, slot, transient))
        if ok:
            if n > available:
                total = sum(r.bytes_fixed + need * r.bytes_slot for r in regions) * height * width
                raise PlacementError(
                    f"model {cfg.name} needs {n} regions of {height}x{width} cores ({total / 2**20:.1f} MiB of SRAM "
                    f"for weights, activations and {tokens} tokens of KV cache); the {device.name} wafer "
                    f"({device.height}x{device.width}) has room for {available} ({available * height * width * budget / 2**20:.1f} MiB)"
                )
            return Placement(cfg, s, tuple(regions), kv_mode, prefill_tokens)
    one = (layer_bytes(cfg, s, elem_bytes) + work_bytes(cfg, s, head, elem_bytes) + need * slot_bytes(cfg, s, 1, elem_bytes)
           + prefill_bytes(cfg, s, 1, head, prefill_tokens, elem_bytes))
    hint = (f"; --kv concat keeps all {tokens} entries in the tail row, --kv shift would need {math.ceil(tokens / height)} per row"
            if kv_mode == "concat" else "")
    if prefill_tokens:
        hint += f"; this counts a {prefill_tokens}-token prefill on the wafer ({-(-prefill_tokens // height)} tokens per row; --prefill token needs none)"
    raise PlacementError(
        f"one layer of {cfg.name} needs {one} bytes per core on a {height}x{width} region "
        f"(with {'its LM head and ' if head else ''}{tokens} tokens of KV cache); a core has {budget}. Use a larger --mesh{hint}"
    )


def place_unbounded(cfg: LlamaConfig, device: DeviceSpec, side: int, **kwargs: Any) -> Placement:
    """``place`` on side x side regions, as many as the model needs whatever the size of the device's fabric
    (one region per layer at most); ``kwargs`` as for ``place``.

    Raises:
        PlacementError: one layer does not fit a region.
    """
    return place(cfg, device.replace(width=side * cfg.n_layers, height=side), side, side, **kwargs)


def default_mesh(cfg: LlamaConfig, device: DeviceSpec, tokens: int, prefill_tokens: int = 0) -> tuple[int, int]:
    """The smallest square region (side a multiple of 8) that holds the whole model, ``tokens`` KV entries
    and room to prefill ``prefill_tokens`` tokens."""
    for side in range(8, min(device.height, device.width) + 1, 8):
        try:
            p = place(cfg, device, side, side, tokens=tokens, prefill_tokens=prefill_tokens)
        except PlacementError:
            continue
        if len(p.regions) == 1:
            return side, side
    raise PlacementError(f"model {cfg.name} does not fit one square region of the {device.name} wafer; give --mesh")


# how the decode layout lays each weight over a region's cores
SPECS = {
    "attn_norm": Spec(None, "y"),
    "wqkv": Spec(None, "y", None, "x"),
    "wo": Spec(None, None, "x", "y"),
    "ffn_norm": Spec(None, "y"),
    "w13": Spec(None, "y", None, "x"),
    "w2": Spec(None, "x", "y"),
    "final_norm": Spec("y"),
    "lm_head": Spec("y", "x"),
    "bqkv": Spec(None, None, "x"),  # like qkv after its allreduce: on every row
}

STACKED = {"attn_norm", "wqkv", "bqkv", "wo", "ffn_norm", "w13", "w2", "k_cache", "v_cache"}  # (layers, ...): read a layer at a time


def weight_shapes(cfg: LlamaConfig, s: RegionShape, region: RegionShare) -> dict[str, tuple[int, ...]]:
    """Global (padded) shapes of the region's weights in the decode layout."""
    g, L = cfg.n_heads // cfg.n_kv_heads, region.layers
    shapes = {
        "attn_norm": (L, s.dim), "wqkv": (L, s.dim, g + 2, s.kv), "wo": (L, g, s.kv, s.dim),
        "ffn_norm": (L, s.dim), "w13": (L, s.dim, 2, s.ffn), "w2": (L, s.ffn, s.dim),
    }
    if cfg.qkv_bias:
        shapes["bqkv"] = (L, g + 2, s.kv)
    if region.head:
        shapes.update(final_norm=(s.dim,), lm_head=(s.dim, s.vocab))
    return shapes


def region_weights(cfg: LlamaConfig, w: LlamaWeights, s: RegionShape, region: RegionShare) -> Iterator[tuple[str, np.ndarray]]:
    """The region's weights, regrouped (GQA) and zero-padded to ``weight_shapes``, one tensor at a time.

    Each tensor is built when asked for, so the host holds one padded copy at a time.
    """
    g, nkv, hd, d = cfg.n_heads // cfg.n_kv_heads, cfg.n_kv_heads, cfg.head_dim, cfg.dim
    sl = slice(region.first_layer, region.first_layer + region.layers)
    L = region.layers
    real = {
        "attn_norm": lambda: w.attn_norm[sl],
        "wqkv": lambda: np.concatenate([w.wq[sl].reshape(L, d, nkv, g, hd).transpose(0, 1, 3, 2, 4).reshape(L, d, g, nkv * hd),
                                        w.wk[sl][:, :, None], w.wv[sl][:, :, None]], axis=2),
        "wo": lambda: w.wo[sl].reshape(L, nkv, g, hd, d).transpose(0, 2, 1, 3, 4).reshape(L, g, nkv * hd, d),
        "ffn_norm": lambda: w.ffn_norm[sl],
        "w13": lambda: np.stack([w.w_gate[sl], w.w_up[sl]], axis=2),
        "w2": lambda: w.w_down[sl],
        "final_norm": lambda: w.final_norm,
        "lm_head": lambda: w.lm_head,
        "bqkv": lambda: np.concatenate([w.bq[sl].reshape(L, nkv, g, hd).transpose(0, 2, 1, 3).reshape(L, g, nkv * hd),
                                        w.bk[sl][:, None], w.bv[sl][:, None]], axis=1),
    }
    for name, shape in weight_shapes(cfg, s, region).items():
        array = real[name]()
        yield name, np.pad(array, [(0, t - n) for n, t in zip(array.shape, shape)]).astype(np.float32, copy=False)
