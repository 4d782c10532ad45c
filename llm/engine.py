"""Llama decode on an emulated wafer: place the weights once, then one protocol run per token.

A model that one region cannot hold goes on several regions of one wafer, laid in snake
order so consecutive ones are neighbours (``regions``): one fabric, one clock per core. The
host writes the token's embedding into region 0 and reads the logits from the last region;
between regions the activation moves as a transfer on the fabric (``regions.handoff_program``,
its routes and links counted like any other), inside the one protocol run of the token.

Surviving a lost tile (Ray): every call that changed the wafer's state since the sequence
began (the prefill, each decode step, a seek) is kept in a journal. When a tile's actor or
its node dies, the wafer is started again (on the nodes still alive), every region's weights
placed again (read again from the file where the engine was given a loader, else from the
driver's copy) and the journal replayed; then the failed call runs again. Each step starts
from zeroed clocks and the replay runs the same protocols on the same data, so the tokens and
the predicted cycles are those of an uninterrupted run.
"""

from __future__ import annotations

import ctypes
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from wafer_actors import Region, Wafer
from wafer_actors.collectives.block_gemm import skew_index
from wafer_actors.device import DeviceSpec, resolve
from wafer_actors.errors import InvalidArgument, TileLost
from wafer_actors.layout import Spec

from .checkpoint import GGUFRows, LlamaWeights
from .converted import Converted
from .config import LlamaConfig
from .decode_protocol import KV_MODES, RegionPlan
from .models import FromFile
from .paper_kernel import check_kernel
from .placement import SPECS, STACKED, Placement, RegionShare, place, region_weights, weight_shapes
from .prefill_protocol import kv_handover, prefill, relayout
from .regions import decode_regions, prefill_crossing, snake, span

ON_FAILURE = ("recover", "fail")
MAX_RECOVERIES = 3  # per call: a wafer that keeps losing tiles is not going to finish
# the weights an engine places: in memory, a converted checkpoint (the tiles read their shards), or a loader
# called at each (re)start, so that the host holds none of them between (``models.FromFile``; it reads a token's
# embedding row from the file, or keeps the table where the format cannot)
Weights = LlamaWeights | Converted | Callable[[], LlamaWeights]


@dataclass(frozen=True)
class Recovery:
    """One lost tile and what it took to carry on.

    ``noticed_at``: wall-clock time (``time.time()``) the loss was noticed; ``restart_s``: host
    seconds to start the wafer again and place the weights; ``replay_s``: to replay the
    ``replayed_tokens`` of the sequence; ``host_s``: both.
    """

    tile: int
    node: str
    reason: str
    noticed_at: float
    replayed_tokens: int
    restart_s: float
    replay_s: float

    @property
    def host_s(self) -> float:
        return self.restart_s + self.replay_s


@dataclass(frozen=True)
class Migration:
    """Tiles moved to another node while decode went on.

    ``background_s``: from the start of the move until it completed (the tiles' buffers copied
    while steps ran); ``pause_s``: host seconds decode waited for what changed since (KV
    entries, activations, clocks) and the switch.
    """

    region: int
    tiles: tuple[int, ...]
    node: str
    background_s: float
    pause_s: float


@dataclass
class StepStats:
    """What one token cost: predicted device cycles (all regions and hand-offs) and host time."""

    cycles: float
    region_cycles: list[float]
    handoff_cycles: float
    host_s: float
    counts: dict[str, int] = field(default_factory=dict)  # messages and bytes, summed over regions
    per_tile: list[dict] = field(default_factory=list, repr=False)  # each tile's statistics, with its region and node
    phases: list[list[tuple[str, float, float, float]]] = field(default_factory=list, repr=False)  # per region, traced


@dataclass
class PrefillStats:
    """What prefilling a prompt cost, in predicted device cycles, phase by phase.

    ``ttft_cycles`` (time to first token) covers skewing the weights, every region's
    layers, the activations crossing between regions and the LM head; ``handover_cycles``
    (moving the KV cache into decode's rows and un-skewing the weights) is paid before the
    second token, so it counts as decode time.
    """

    tokens: int
    relayout_cycles: float  # weights skewed for prefill (region 0's; the others skew theirs meanwhile)
    region_cycles: list[float]  # each region's layers (and the LM head on the last), from its input's arrival
    crossing_cycles: float  # the prompt's activations crossing from region to region (transfers)
    handover_cycles: float  # KV cache to decode rows, weights un-skewed (slowest region)
    host_s: float
    sram_high_water_bytes: int
    # per region, per layer run (the LM head last): start and end cycles from the region's start, and its phases
    # (``RunStats.phases``, from the layer's start) when traced
    layers: list[list[tuple[float, float, list]]] = field(default_factory=list, repr=False)

    @property
    def ttft_cycles(self) -> float:
        return self.relayout_cycles + sum(self.region_cycles) + self.crossing_cycles


@dataclass
class DecodeTotals:
    """Sums over the tokens run so far."""

    tokens: int = 0
    cycles: float = 0.0
    host_s: float = 0.0
    steps: list[StepStats] = field(default_factory=list, repr=False)


def skew_rows(x: np.ndarray, p: int) -> np.ndarray:
    """Lay out a (S, D) activation x-skewed for a P x P region (see ``block_gemm``): block (r, c) <- (r, skew[r, c])."""
    m, k = x.shape
    blocks = x.reshape(p, m // p, p, k // p).transpose(0, 2, 1, 3)
    return blocks[np.arange(p)[:, None], skew_index(p)].transpose(0, 2, 1, 3).reshape(m, k)


class WaferLlama:
    """A Llama placed on one or more regions of an emulated wafer.

    Args:
        cfg, weights: the model: its weights in host memory, a converted checkpoint whose
            tiles read their own shards (``llm.converted``; see ``from_converted``), or a loader
            called on each (re)start, so that the host keeps only the token embeddings (of a
            GGUF file, only the rows it looked up) while the tiles run (``llm.models.FromFile``);
            None with ``cost_only``.
        mesh: ``(height, width)`` of one region, in cores; the regions go on one wafer in snake order
            (``regions.snake``).
        device: preset, device file or ``DeviceSpec``.
        tiles: ``(rows, cols)`` of tiles (actors) per region.
        transport: ``"ray"`` or ``"local"``.
        kv: ``"shift"`` (WaferLLM) or ``"concat"`` (the baseline).
        tokens: KV entries the cache must hold (the placement refuses a mesh that cannot).
        regions: spread the layers over at least this many regions.
        algo: allreduce algorithm of every GEMV (``ktree``, ``pipeline``, ``ring``, ``chain``);
            ``group_num``: K-tree groups (default near sqrt of the axis).
        cost_only: shapes only (no weights, no logits), same protocols and cycles.
        dtype: element type on the cores; full numerics run in float32, cost-only may use float16.
        lm_head: place the final norm and LM head (off to time decoder layers alone).
        prefill_tokens: keep room on the cores to prefill prompts up to this long with
            ``prefill`` (square regions only); 0 feeds prompts token by token.
        executor: ``fused`` (default) or ``step`` (the specification; see ``Wafer``).
        kernel: ``faithful`` (the model as it is) or ``paper``: q, k, v and gate, up run as
            separate GEMVs and GEMMs, as in the authors' timing kernel (cost-only; give the
            kernel's shapes with ``llm.paper_kernel.paper_config``).
        on_failure: ``recover`` (default): a lost tile is replaced and the sequence replayed
            (see the module docstring; ``recoveries`` lists each one); ``fail``: raise ``TileLost``.
        snapshot_every: with ``recover``, copy every tile's state but the weights (KV cache,
            activations, clocks) to the host every this many decode steps, so that a recovery
            restores it and replays only the steps since (0: replay the whole sequence).
        on_load: called with the bytes of each weight tensor as the tiles receive it and the
            total (``weight_bytes()``), on every (re)start: a progress bar.
        trace: record every decode step's phases (``StepStats.phases``) for a timeline (``llm.trace``).
        activity: record per-core compute cycles and per-link bytes (``Wafer.activity``) for heatmaps.

    Raises:
        PlacementError: the model does not fit (bytes needed and available in the message).
        ValueError: bad ``kv`` or ``algo``.
    """

    def __init__(self, cfg: LlamaConfig, weights: Weights | None, *, mesh: tuple[int, int],
                 device: str | DeviceSpec = "wse2", tiles: tuple[int, int] = (1, 1), transport: str = "ray",
                 kv: str = "shift", tokens: int = 1, regions: int = 1, algo: str = "ktree", group_num: int | None = None,
                 cost_only: bool = False, dtype: str = "float32", lm_head: bool = True, prefill_tokens: int = 0,
                 executor: str = "fused", kernel: str = "faithful", on_failure: str = "recover", snapshot_every: int = 0,
                 on_load: Callable[[int, int], None] | None = None, trace: bool = False, activity: bool = False):
        if on_failure not in ON_FAILURE:
            raise InvalidArgument(f"on_failure must be one of {ON_FAILURE}, got {on_failure!r}")
        if not isinstance(snapshot_every, int) or snapshot_every < 0:
            raise InvalidArgument(f"snapshot_every must be a number of steps >= 0 (0: no snapshots), got {snapshot_every!r}")
        if check_kernel(kernel) == "paper" and not cost_only:
            raise InvalidArgument("the paper kernel is a timing configuration: it runs with cost_only=True")
        if kv not in KV_MODES:
            raise InvalidArgument(f"kv must be one of {KV_MODES}, got {kv!r}")
        if weights is None and not cost_only:
            raise InvalidArgument("weights are needed unless cost_only=True")
        if dtype not in ("float32", "float16") or (dtype != "float32" and not cost_only):
            raise InvalidArgument(f"dtype must be float32, or float16 with cost_only=True (numerics are float32); got {dtype!r}")
        self.cfg, self.weights = cfg, weights
        self.embeddings: np.ndarray | GGUFRows | None = None  # (vocab, dim): each token's row, looked up here
        self.device: DeviceSpec = resolve(device)
        if isinstance(weights, Converted):
            weights.check_request(tuple(mesh), tuple(tiles), self.device)
        self.dtype = dtype
        self.placement: Placement = place(cfg, self.device, *mesh, kv_mode=kv, tokens=tokens, regions=regions,
                                          elem_bytes=np.dtype(dtype).itemsize, head=lm_head, prefill_tokens=prefill_tokens)
        if isinstance(weights, Converted):
            weights.check_placement(self.placement)
        self.mesh, self.tiles, self.kv, self.algo = tuple(mesh), tuple(tiles), kv, algo
        self.cost_only = cost_only
        self.plans = [
            RegionPlan(r.layers, cfg.dim, cfg.n_heads // cfg.n_kv_heads, cfg.n_kv_heads, cfg.head_dim, cfg.kv_dim,
                       cfg.norm_eps, tuple(cfg.rope_freqs().tolist()), r.cap, kv, r.head, algo, group_num=group_num,
                       dtype=dtype, qkv_bias=cfg.qkv_bias, split=kernel == "paper")
            for r in self.placement.regions
        ]
        self.transport, self.executor, self.on_failure = transport, executor, on_failure
        self.snapshot_every, self.on_load, self.trace, self.activity = snapshot_every, on_load, trace, activity
        # the placement holds no more regions than the fabric has room for in rows of regions: the snake fits
        self.origins = snake((self.device.height, self.device.width), self.mesh, len(self.placement.regions))
        self.recoveries: list[Recovery] = []
        self.migrations: list[Migration] = []
        self._moving: dict[int, tuple[Any, float]] = {}  # region -> (move, start) of its migration under way
        self.wafer: Wafer | None = None
        self._trim_after_run = False
        self.reset()
        self._start(None)

    @classmethod
    def from_converted(cls, path: str | Path, *, mesh: tuple[int, int] | None = None, tiles: tuple[int, int] | None = None,
                       device: str | DeviceSpec | None = None, regions: int | None = None, dtype: str | None = None,
                       **kwargs: Any) -> "WaferLlama":
        """Start a model from a directory written by ``llm.converted.convert`` (``wafer-llm convert``): each tile
        reads its own weights from its shard file. ``mesh``, ``tiles``, ``device`` and ``regions`` default to those
        it was converted for; ``dtype`` (float32 or float16), if given, is the weights' precision the caller expects
        the files to hold; other arguments as for ``WaferLlama`` (``tokens``, ``prefill_tokens``, ``transport``, ...).

        Raises:
            CheckpointError: not a finished conversion.
            ConvertedMismatch: a mesh, tiling, device, dtype or layer split other than the conversion's.
        """
        conv = Converted(path)
        if dtype is not None:
            conv.check_dtype(dtype)
        return cls(conv.cfg, conv, mesh=mesh or conv.mesh, tiles=tiles or conv.tiles,
                   device=conv.device if device is None else device, regions=regions or len(conv.index["regions"]),
                   **kwargs)

    def weight_bytes(self) -> int:
        """Bytes of weights the tiles receive on a start (what ``on_load`` counts up to)."""
        if isinstance(self.weights, Converted):
            return self.weights.nbytes()
        s = self.placement.shape
        return sum(4 * int(np.prod(shape)) for r in self.placement.regions for shape in weight_shapes(self.cfg, s, r).values())

    def _start(self, nodes: tuple[str, ...] | None) -> None:
        """Start the wafer (its Ray tiles on ``nodes``; None: every alive node) and place every region's weights."""
        try:
            self.wafer = Wafer(span(self.mesh, self.origins), device=self.device, tiles=self.tiles,
                               transport=self._transport(nodes), cost_only=self.cost_only, executor=self.executor,
                               region=self.mesh, origins=self.origins)
            weights = self.weights() if callable(self.weights) else self.weights
            if weights is not None:  # a loader that reads a token's row from its file spares the host the table
                rows = self.weights.rows() if isinstance(self.weights, FromFile) else None
                self.embeddings = weights.tok_embeddings if rows is None else rows
            for share in self.placement.regions:
                self._load(self.wafer.regions[share.index], share, weights)
            del weights  # a loader's weights: the tiles hold them now
            _trim_heap()
            self._trim_after_run = True  # Ray frees the calls that carried the weights later, on its own threads
            if self.trace or self.activity:
                self.wafer.trace(self.trace, self.activity)
        except BaseException:
            self.close()
            raise

    def _transport(self, nodes: tuple[str, ...] | None) -> Any:
        if nodes is None:
            return self.transport
        from wafer_actors.fabric.ray import RayOptions, RayTransport

        return RayTransport(RayOptions(nodes=nodes))

    # ---- surviving lost tiles -------------------------------------------------------------
    def _survive(self, call: Callable[..., Any], *args: Any) -> Any:
        """Run ``call``; when a tile is lost, recover (``on_failure="recover"``) and run it again."""
        lost, attempts = None, 0
        while True:
            try:
                if lost is not None:
                    self._recover(lost)
                result = call(*args)
                if self._trim_after_run:  # what the start left is freed by now (~130 MB with four Ray tiles)
                    self._trim_after_run = False
                    _trim_heap()
                return result
            except TileLost as err:
                attempts += 1
                if self.on_failure == "fail" or attempts > MAX_RECOVERIES:
                    raise
                lost = err

    def _recover(self, lost: TileLost) -> None:
        """Start the wafer again on the nodes still alive and replay the journal."""
        noticed, t0 = time.time(), time.perf_counter()
        pos = self.pos
        self.close()  # the wafer starts again from scratch: moves under way are dropped
        self._start(_surviving_nodes(lost.node))
        t1 = time.perf_counter()
        self.pos, replayed, done = 0, 0, 0
        if self._snapshot is not None:
            done, self.pos, states = self._snapshot
            self.wafer.restore(states)
        for kind, arg in self._journal[done:]:
            if kind == "prefill":
                self._prefill(arg, None)
                replayed += self.pos
            elif kind == "seek":
                self.pos = arg
            else:
                self._step(arg)
                replayed += 1
        assert self.pos == pos, (self.pos, pos)
        self.recoveries.append(Recovery(lost.tile, lost.node, lost.reason, noticed, replayed, t1 - t0,
                                        time.perf_counter() - t1))

    def _take_snapshot(self) -> None:
        """Copy every tile's state but its weights to the host, with the journal entries and position it covers."""
        t0 = time.perf_counter()
        weights = {n for r in self.placement.regions for n in weight_shapes(self.cfg, self.placement.shape, r)}
        states = self.wafer.snapshot(sorted(weights))
        self._snapshot = (len(self._journal), self.pos, states)
        self.snapshot_s += time.perf_counter() - t0

    # ---- planned migration ----------------------------------------------------------------
    def migrate(self, node: str, tiles: list[int] | None = None, region: int = 0) -> None:
        """Move ``tiles`` of region ``region`` (its tile numbers; default: all of them) to the Ray node ``node`` while
        decode goes on.

        The tiles' buffers (weights, KV cache) are copied actor to actor in the background while
        steps run (regions move at the same time); a region's move completes before the first
        step after its copy is done (or before a prefill, or at ``finish_migration()``, which
        wait for it), pausing only to send what changed since (the KV entries written, the
        activations, the clocks) and to switch actors.
        ``migrations`` records each with its pause.

        Raises:
            InvalidArgument: in-process tiles, a bad region or tile index, a node that is not alive.
        """
        if not 0 <= region < len(self.wafer.regions):
            raise InvalidArgument(f"region must be in [0, {len(self.wafer.regions)}), got {region}")
        if region in self._moving:
            self._finish(region)
        per = self.tiles[0] * self.tiles[1]
        tiles = list(range(per)) if tiles is None else [int(t) for t in tiles]
        bad = [t for t in tiles if not 0 <= t < per]
        if bad or not tiles:
            raise InvalidArgument(f"tiles to move must be a region's tile numbers in [0, {per}), got {list(tiles)}")
        keep = list(weight_shapes(self.cfg, self.placement.shape, self.placement.regions[region]))
        t0 = time.perf_counter()
        base = self.wafer.regions[region].base
        self._moving[region] = (self.wafer.move_start([base + t for t in tiles], node, keep), t0)

    def finish_migration(self, wait: bool = True) -> None:
        """Complete the migrations under way (between runs); ``wait=False``: only those whose background copy is done.

        A tile lost meanwhile is recovered as in any call: the wafer starts again on the default
        placement and the migrations under way are dropped.
        """
        for region in list(self._moving):
            if region in self._moving and (wait or self.wafer.move_ready(self._moving[region][0])):
                self._finish(region)

    def _finish(self, region: int) -> None:
        move, t0 = self._moving.pop(region)
        t1 = time.perf_counter()
        try:
            self.wafer.move_finish(move)
        except TileLost as lost:
            if self.on_failure == "fail":
                raise
            self._survive(self._recover, lost)
            return
        base = self.wafer.regions[region].base
        self.migrations.append(Migration(region, tuple(t - base for t in move.tiles), move.node, time.perf_counter() - t0,
                                         time.perf_counter() - t1))

    # ---- placement ------------------------------------------------------------------------
    def _load(self, cores: Region, region: RegionShare, weights: LlamaWeights | Converted | None) -> None:
        """Place the region's weights on ``cores`` once (decode layout) and allocate its activations and KV cache."""
        cfg, s = self.cfg, self.placement.shape
        g = cfg.n_heads // cfg.n_kv_heads
        if self.cost_only:
            for name, shape in weight_shapes(cfg, s, region).items():
                cores.alloc(name, shape, self.dtype, SPECS[name], stacked=name in STACKED)
        elif isinstance(weights, Converted):
            weights.load(cores, self.placement, region, self.on_load)
        else:
            for name, array in region_weights(cfg, weights, s, region):
                cores.load(name, array, SPECS[name], stacked=name in STACKED)
                if self.on_load:
                    self.on_load(array.nbytes, self.weight_bytes())
                del array  # before the next padded tensor is built
        work = {
            "x": ((s.dim,), Spec("y")), "h": ((s.dim,), Spec("y")), "y": ((s.dim,), Spec("y")),
            "ss": ((1,), Spec(None)), "qkv": ((g + 2, s.kv), Spec(None, "x")), "o": ((g, s.kv), Spec(None, "x")),
            "ff": ((2, s.ffn), Spec(None, "x")), "z": ((s.ffn,), Spec("x")),
            "att_m": ((cfg.n_kv_heads, g), Spec(None, None)), "att_s": ((cfg.n_kv_heads, g), Spec(None, None)),
            "kv_out": ((2, s.kv), Spec(None, "x")), "kv_in": ((2, s.kv), Spec(None, "x")),
            "k_cache": ((region.layers, region.cap, s.kv), Spec(None, None, "x")),
            "v_cache": ((region.layers, region.cap, s.kv), Spec(None, None, "x")),
        }
        if region.head:
            work["logits"] = ((s.vocab,), Spec("x"))
        for name, (shape, spec) in work.items():
            cores.alloc(name, shape, self.dtype, spec, stacked=name in STACKED)

    # ---- decode ---------------------------------------------------------------------------
    def reset(self) -> None:
        """Start a new sequence (the cache slots are reused; positions start again at 0)."""
        self.pos = 0
        self.totals = DecodeTotals()
        self._journal: list[tuple[str, Any]] = []  # ("prefill", prompt) / ("step", token) / ("seek", pos)
        self._snapshot: tuple[int, int, list] | None = None  # (journal entries it covers, pos, states per region)
        self.snapshot_s = 0.0  # host seconds spent taking snapshots

    def seek(self, pos: int) -> None:
        """Cost-only: continue at position ``pos`` as if a context of ``pos`` tokens were cached.

        Raises:
            ValueError: on a wafer with numerics (its cache would hold no real entries).
        """
        if not self.cost_only:
            raise InvalidArgument("seek() is for cost-only runs; with numerics, feed the tokens")
        self.placement.check_tokens(pos + 1)
        self.pos = int(pos)
        self._journal.append(("seek", self.pos))

    def step(self, token: int) -> tuple[np.ndarray | None, StepStats]:
        """Run ``token`` at the next position; return (logits (vocab,) or None when cost-only, stats).

        Raises:
            PlacementError: the KV cache (or the model's context) has no room for another token.
            ValueError: a token id outside the vocabulary.
        """
        if not 0 <= int(token) < self.cfg.vocab_size:
            raise InvalidArgument(f"token id {token} is outside the vocabulary [0, {self.cfg.vocab_size})")
        self.placement.check_tokens(self.pos + 1)
        self.finish_migration(wait=False)
        logits, st = self._survive(self._step, int(token))
        self._journal.append(("step", int(token)))
        self.totals.tokens += 1
        self.totals.cycles += st.cycles
        self.totals.host_s += st.host_s
        self.totals.steps.append(st)
        if self.snapshot_every and self.on_failure == "recover" and self.totals.tokens % self.snapshot_every == 0:
            self._take_snapshot()
        return logits, st

    def _step(self, token: int) -> tuple[np.ndarray | None, StepStats]:
        t0 = time.perf_counter()
        s = self.placement.shape
        x = None
        if not self.cost_only:
            x = np.zeros(s.dim, np.float32)
            x[: self.cfg.dim] = self.embeddings[int(token)]
        # one call per tile: the activation into region 0, the clocks zeroed, the logits out of the last region
        out = ["logits"] if not self.cost_only and self.plans[-1].head else []
        stats = self.wafer.run(decode_regions, plans=[p.as_kwargs() for p in self.plans], pos=self.pos, shape=self.mesh,
                               origins=self.origins, reset=True, outputs=out,
                               inputs=None if x is None else {"x": (x, Spec("y"))})
        n = len(self.plans)
        begin = [stats.start] + [stats.stamps[f"begin:{r}"] for r in range(1, n)]  # x in: the last of the region's cores
        end = [stats.stamps[f"end:{r}"] for r in range(n)]
        phases = [stats.phases] if n == 1 else [[(label, c - (b - stats.start), comp, host) for label, c, comp, host in ph]
                                                for ph, b in zip(stats.region_phases, begin)]
        nodes, per = self.wafer.nodes(), self.tiles[0] * self.tiles[1]
        per_tile = [{"region": t // per, "tile": t % per, "node": nodes[t], **d} for t, d in enumerate(stats.per_tile)]
        logits = stats.outputs["logits"][: self.cfg.vocab_size] if "logits" in stats.outputs else None
        self.pos += 1
        return logits, StepStats(stats.cycles, [e - b for b, e in zip(begin, end)],
                                 sum(b - e for e, b in zip(end, begin[1:])), time.perf_counter() - t0, dict(stats.counts),
                                 per_tile, phases)

    def prefill(self, prompt_ids: list[int] | int, on_layer: Callable[[int, int], None] | None = None
                ) -> tuple[np.ndarray | None, PrefillStats]:
        """Run a whole prompt at positions 0.. at once (WaferLLM's prefill) and leave the cache ready for ``step``.

        Pass the token ids, or (cost-only) just the prompt length. Returns the logits of
        every prompt position ``(tokens, vocab)`` (None when cost-only or without an LM
        head) and the predicted cycles of each phase. ``on_layer(done, total)`` is called after
        every layer (and the LM head) of every region.

        Raises:
            PlacementError: the prompt is longer than the room kept (``prefill_tokens``), or
                the KV cache cannot hold it.
            ValueError: an empty prompt or a token id outside the vocabulary.
        """
        ids = None if isinstance(prompt_ids, (int, np.integer)) else [int(t) for t in prompt_ids]
        n = int(prompt_ids) if ids is None else len(ids)
        if ids is None and not self.cost_only:
            raise InvalidArgument("prefill() needs the prompt's token ids unless the wafer is cost-only")
        if n < 1:
            raise InvalidArgument("the prompt is empty: give at least one token")
        bad = [t for t in ids or [] if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise InvalidArgument(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {self.cfg.vocab_size})")
        self.placement.check_prefill(n)
        self.placement.check_tokens(n)
        self.finish_migration()
        self.reset()
        prompt = n if ids is None else ids
        out = self._survive(self._prefill, prompt, on_layer)
        self._journal.append(("prefill", prompt))
        return out

    def _prefill(self, prompt: list[int] | int, on_layer: Callable[[int, int], None] | None
                 ) -> tuple[np.ndarray | None, PrefillStats]:
        """Every region in turn on one clock: region 0's input from the host, each next one's from the region before
        it (a transfer), the logits from the last; the regions skew and un-skew their weights in parallel."""
        ids = None if isinstance(prompt, int) else prompt
        n = prompt if ids is None else len(ids)
        t0 = time.perf_counter()
        s, p = self.placement.shape, self.mesh[0]
        st = -(-n // p)
        wafer, shares = self.wafer, self.placement.regions
        wafer.reset_clocks()
        relay = [wafer.run(relayout, region=r.index, layers=r.layers, head=r.head, to="prefill").end for r in shares]
        cycles, crossing, layers, ends = [], 0.0, [], []
        total, done = sum(r.layers + r.head for r in shares), 0
        for i, region in enumerate(shares):
            cores = wafer.regions[i]
            cores.alloc("kv_p", (st * p, region.layers, 2, s.kv), self.dtype, Spec("y", None, None, "x"))
            if region.head:
                cores.alloc("logits_p", (st * p, s.vocab), self.dtype, Spec("y", "x"))
            if i == 0 and not self.cost_only:
                x = np.zeros((st * p, s.dim), np.float32)
                x[:n, : self.cfg.dim] = self.embeddings[ids]
                cores.load("xp", skew_rows(x, p), Spec("y", "x"))
            else:
                cores.alloc("xp", (st * p, s.dim), self.dtype, Spec("y", "x"))
            begin = relay[0]
            if i:
                begin = wafer.run(prefill_crossing, shape=self.mesh, a=self.origins[i - 1], b=self.origins[i]).end
                crossing += begin - ends[-1]
                wafer.regions[i - 1].free("xp")
            runs = []
            for layer in range(region.layers + region.head):  # one run per layer: the clocks run on
                runs.append(wafer.run(prefill, region=i, plan=self.plans[i].as_kwargs(), tokens=n, layer=layer))
                done += 1
                if on_layer:
                    on_layer(done, total)
            ends.append(max(r.end for r in runs))
            cycles.append(ends[-1] - begin)
            layers.append([(r.start - begin, r.end - begin, r.phases) for r in runs])
        last = wafer.regions[-1]
        logits = None
        if not self.cost_only and self.plans[-1].head:
            logits = last.read("logits_p")[:n, : self.cfg.vocab_size]
        last.free("xp")
        if self.plans[-1].head:
            last.free("logits_p")
        handover = []
        for i, region in enumerate(shares):
            wafer.run(kv_handover, region=i, st=st, tokens=n, mode=self.kv, cap=region.cap)
            wafer.regions[i].free("kv_p")
            back = wafer.run(relayout, region=i, layers=region.layers, head=region.head, to="decode")
            handover.append(back.end - ends[i])
        self.pos = n
        return logits, PrefillStats(n, relay[0], cycles, crossing, max(handover), time.perf_counter() - t0,
                                    self.sram_high_water(), layers)

    # ---- reports --------------------------------------------------------------------------
    def sram_high_water(self) -> int:
        """Highest SRAM high-water mark of any core, in bytes."""
        return int(self.wafer.memory()[1].max())

    def summary(self) -> dict[str, Any]:
        """Predicted and emulation figures for the tokens run so far."""
        t = self.totals
        cpt = t.cycles / t.tokens if t.tokens else 0.0
        return {
            "predicted": {
                "cycles_per_step": cpt,  # one token through every layer (every token fed counts), no hand-over
                "steps_per_s": self.device.clock_hz / cpt if cpt else 0.0,
                "device": self.device.name,
                "regions": len(self.plans),
                "handoff_cycles_per_token": t.steps[-1].handoff_cycles if t.steps else 0.0,
            },
            "emulation": {
                "ms_per_token": 1e3 * t.host_s / t.tokens if t.tokens else 0.0,
                "tiles": list(self.tiles),
                "mesh": list(self.mesh),
                "sram_high_water_bytes": self.sram_high_water(),
                "sram_bytes": self.device.sram_bytes,
            },
            "kv": {"mode": self.kv, "slots_per_core": self.placement.cap, "capacity_tokens": self.placement.capacity()},
            "recoveries": [{**asdict(r), "host_s": r.host_s} for r in self.recoveries],  # lost tiles survived
            "migrations": [asdict(m) for m in self.migrations],
        }

    def close(self) -> None:
        if self.wafer is not None:
            for move, _ in self._moving.values():
                self.wafer.move_cancel(move)
            self.wafer.shutdown()
        self._moving = {}
        self.wafer = None

    def __enter__(self) -> "WaferLlama":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _trim_heap() -> None:
    """Give the C heap's free pages back to the system: glibc keeps freed blocks smaller than its mmap threshold,
    which after the weights are placed (padded tensors, their blocks) is ~100 MB the host does not use again."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _surviving_nodes(lost: str) -> tuple[str, ...] | None:
    """The nodes to start tiles on after a tile of node ``lost`` died: None (every alive node) if ``lost`` lives.

    Ray marks a node dead as soon as its raylet goes away; a dead tile on a node still
    marked alive after a short wait lost only its own process.
    """
    import ray

    for _ in range(5):
        nodes = {n["NodeID"]: n["Alive"] for n in ray.nodes()}
        if not nodes.get(lost, False):
            here = ray.get_runtime_context().get_node_id()
            alive = sorted(n for n, up in nodes.items() if up)
            return tuple([here] * (here in alive) + [n for n in alive if n != here])
        time.sleep(0.4)
    return None
