"""Converted checkpoints: a model written already in the tiles' layout, one shard file per tile.

``convert`` places the model as a run would (mesh, regions, tiles, device) and writes each
region's weights in the decode layout, every tile's blocks in one file exactly as the tile
keeps them in memory (``wafer_actors.shards``: aligned chunks, a CRC-32 each), with an index
(``index.json``): the placement it was made for, the source model's SHA-256, and every
chunk's offset, shape and dtype. The tokenizer (``tokenizer.json``, ``tokenizer_config.json``)
and the token embeddings the host looks up (``embeddings.npy``, memory-mapped) travel with it.
The index is written last: a conversion that did not finish cannot be loaded.

Loading (``WaferLlama.from_converted``, ``generate --model DIR``): each tile reads its own
chunks from its shard: no dequantization, no re-layout, no tensor through the driver or
Ray's object store. On a cluster every tile reads the directory at the same path on its
own node, so the directory must be there on every node (shared storage, or a copy on each).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from wafer_actors import Layout, Mesh, Region, Tiling, scatter
from wafer_actors.device import DeviceSpec
from wafer_actors.errors import InputError
from wafer_actors.shards import Chunk, write_chunk

from .checkpoint import LlamaWeights
from .config import LlamaConfig
from .placement import (
    SPECS,
    STACKED,
    Placement,
    RegionShare,
    place,
    region_weights,
    weight_shapes,
)
from .tokenizer import Tokenizer

FORMAT = "wafer-llm-converted"
VERSION = 1
INDEX = "index.json"
DTYPES = ("float32", "float16")


class ConvertedMismatch(InputError, ValueError):
    """A converted checkpoint was made for another placement than the one asked for."""


def is_converted(path: Path) -> bool:
    """Whether ``path`` is a directory ``convert`` wrote to (finished or not)."""
    return path.is_dir() and ((path / INDEX).is_file() or (path / "region0").is_dir())


def source_digest(path: Path) -> str:
    """SHA-256 of a checkpoint: its file, or a directory's files in name order (names included)."""
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode() + b"\0")
        with open(f, "rb") as fh:
            while block := fh.read(16 << 20):
                h.update(block)
    return h.hexdigest()


def _device_json(device: DeviceSpec) -> dict:
    return dataclasses.asdict(device)


def _regions_json(p: Placement) -> list[dict]:
    return [{"first_layer": r.first_layer, "layers": r.layers, "head": r.head} for r in p.regions]


def convert(cfg: LlamaConfig, weights: LlamaWeights, tok: Tokenizer | None, out: str | Path, *, mesh: tuple[int, int],
            device: DeviceSpec, tiles: tuple[int, int] = (1, 1), regions: int = 1, kv: str = "shift", tokens: int = 1,
            prefill_tokens: int = 0, dtype: str = "float32", source: str = "", digest: str = "",
            progress: Callable[[int, int], None] | None = None) -> dict:
    """Write ``weights`` placed on ``mesh`` regions of ``device`` in ``tiles`` tiles into the directory ``out``.

    ``tokens``, ``prefill_tokens`` and ``kv`` decide, as in a run, how many regions the model
    needs (the KV cache and prefill room are not stored). ``dtype``: the weights' type in the
    files (float16 halves them; the tiles widen them to float32 as they read). ``progress``
    is called with the bytes of each chunk written and the total to write. Returns the index.

    Raises:
        PlacementError: the model does not fit.
        InvalidArgument: ``out`` exists and is not empty, or a bad ``dtype``.
    """
    from wafer_actors.errors import InvalidArgument

    if dtype not in DTYPES:
        raise InvalidArgument(f"dtype must be one of {DTYPES}, got {dtype!r}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InvalidArgument(f"{out} exists and is not an empty directory: convert into a new one")
    placement = place(cfg, device, *mesh, kv_mode=kv, tokens=tokens, regions=regions, prefill_tokens=prefill_tokens)
    out.mkdir(parents=True, exist_ok=True)
    m = Mesh(*mesh)
    rects = Tiling(m, tuple(tiles)).rects
    total = sum(np.dtype(dtype).itemsize * m.height * m.width * int(np.prod(Layout(m, SPECS[n]).block_shape(shape)))
                for r in placement.regions for n, shape in weight_shapes(cfg, placement.shape, r).items())
    index_regions = []
    for region in placement.regions:
        folder = out / f"region{region.index}"
        folder.mkdir()
        chunks: list[list[Chunk]] = [[] for _ in rects]
        with ExitStack() as stack:
            files = [stack.enter_context(open(folder / f"tile{i}.bin", "wb")) for i in range(len(rects))]
            for name, array in region_weights(cfg, weights, placement.shape, region):
                blocks = scatter(array, Layout(m, SPECS[name]))  # one padded tensor and its blocks at a time
                for i, r in enumerate(rects):
                    chunk = write_chunk(files[i], name, blocks[r.y0 : r.y1, r.x0 : r.x1], name in STACKED, dtype)
                    chunks[i].append(chunk)
                    if progress:
                        progress(chunk.nbytes, total)
                del array, blocks
        index_regions.append({**_regions_json(placement)[region.index],
                              "tiles": [{"file": f"region{region.index}/tile{i}.bin", "chunks": [c.as_json() for c in cs]}
                                        for i, cs in enumerate(chunks)]})
    np.save(out / "embeddings.npy", weights.tok_embeddings.astype(dtype, copy=False))
    if tok is not None:
        tok.save(out)
    index = {
        "format": FORMAT, "version": VERSION,
        "source": {"path": str(source), "sha256": digest},
        "config": dataclasses.asdict(cfg),
        "placement": {"mesh": list(mesh), "tiles": list(tiles), "device": _device_json(device), "dtype": dtype,
                      "kv": kv, "tokens": tokens, "prefill_tokens": prefill_tokens},
        "regions": index_regions,
    }
    (out / INDEX).write_text(json.dumps(index, indent=1))
    return index


class Converted:
    """A converted checkpoint opened for a run: its index, config, tokenizer and memory-mapped embeddings.

    Raises (on opening):
        CheckpointError: no finished conversion at ``path``, or another format version.
    """

    def __init__(self, path: str | Path):
        from .errors import CheckpointError

        self.path = Path(path).resolve()
        try:
            self.index = json.loads((self.path / INDEX).read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{self.path} has no {INDEX}: its conversion did not finish (convert it again)") from None
        except ValueError as err:
            raise CheckpointError(f"{self.path / INDEX} is not valid JSON ({err}): convert the model again") from None
        if self.index.get("format") != FORMAT or self.index.get("version") != VERSION:
            raise CheckpointError(f"{self.path / INDEX} is not a {FORMAT} index of version {VERSION} "
                                  f"(format {self.index.get('format')!r}, version {self.index.get('version')!r})")
        self.cfg = LlamaConfig(**self.index["config"])
        p = self.index["placement"]
        self.mesh, self.tiles, self.dtype = tuple(p["mesh"]), tuple(p["tiles"]), p["dtype"]
        self.device = DeviceSpec(**p["device"])
        emb = self.path / "embeddings.npy"
        try:
            self.tok_embeddings = np.load(emb, mmap_mode="r")  # the host reads the rows of the tokens it runs
        except (OSError, ValueError) as err:
            raise CheckpointError(f"cannot read {emb}: {err}; convert the model again") from None
        if self.tok_embeddings.shape != (self.cfg.vocab_size, self.cfg.dim):
            raise CheckpointError(f"{emb} holds {self.tok_embeddings.shape}, the model needs "
                                  f"{(self.cfg.vocab_size, self.cfg.dim)}; convert the model again")

    def tokenizer(self) -> Tokenizer | None:
        """The model's tokenizer, if the source had one."""
        return Tokenizer.from_hf(self.path) if (self.path / "tokenizer.json").exists() else None

    def describe(self) -> str:
        regions = self.index["regions"]
        layers = ", ".join(f"layers {r['first_layer']}-{r['first_layer'] + r['layers'] - 1}" for r in regions)
        return (f"mesh {self.mesh[0]}x{self.mesh[1]}, {len(regions)} region(s) ({layers}), tiles "
                f"{self.tiles[0]}x{self.tiles[1]}, device {self.device.name}, {self.dtype}")

    def _refuse(self, asked: str) -> None:
        raise ConvertedMismatch(f"{self.path} was converted for {self.describe()}; this run asks for {asked}. Run with "
                                "the settings it was converted for, or convert the model again with `wafer-llm convert`")

    def check_dtype(self, dtype: str) -> None:
        """Refuse files that hold the weights in another precision than ``dtype``."""
        if dtype != self.dtype:
            self._refuse(f"weights in {dtype}")

    def check_request(self, mesh: tuple[int, int], tiles: tuple[int, int], device: DeviceSpec) -> None:
        """Refuse a mesh, tiling or device other than the conversion's (before any placement)."""
        if tuple(mesh) != self.mesh:
            self._refuse(f"mesh {mesh[0]}x{mesh[1]}")
        if tuple(tiles) != self.tiles:
            self._refuse(f"tiles {tiles[0]}x{tiles[1]}")
        if _device_json(device) != _device_json(self.device):
            differ = [k for k, v in _device_json(device).items() if _device_json(self.device)[k] != v]
            self._refuse(f"device {device.name} (differs in {', '.join(differ)})")

    def check_placement(self, placement: Placement) -> None:
        """Refuse a placement whose regions hold other layers than the conversion's (a longer context, more regions)."""
        got = _regions_json(placement)
        want = [{k: r[k] for k in ("first_layer", "layers", "head")} for r in self.index["regions"]]
        if got != want:
            layers = ", ".join(f"layers {r['first_layer']}-{r['first_layer'] + r['layers'] - 1}" for r in got)
            self._refuse(f"{len(got)} region(s) ({layers}) to hold its KV cache and prefill")

    def nbytes(self) -> int:
        """Bytes of every chunk of every shard."""
        return sum(c["nbytes"] for r in self.index["regions"] for t in r["tiles"] for c in t["chunks"])

    def load(self, cores: Region, placement: Placement, region: RegionShare,
             progress: Callable[[int, int], None] | None = None) -> int:
        """Have the tiles of ``cores`` (a wafer's region) read ``region``'s weights from their shards; returns the
        bytes read.
        ``progress`` is called with each tensor's bytes and ``nbytes()``."""
        entry = self.index["regions"][region.index]
        total = 0
        chunks = [{c["name"]: Chunk.from_json(c) for c in tile["chunks"]} for tile in entry["tiles"]]
        for name, shape in weight_shapes(self.cfg, placement.shape, region).items():
            parts = [(str(self.path / tile["file"]), cs[name]) for tile, cs in zip(entry["tiles"], chunks)]
            total += cores.load_chunks(name, shape, SPECS[name], parts)
            if progress:
                progress(sum(c.nbytes for _, c in parts), self.nbytes())
        return total

