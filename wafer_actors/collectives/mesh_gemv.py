"""MeshGEMV: y = x . W on a core mesh (WaferLLM §6).

Layout, reducing along ``axis = "y"`` (the other axis swaps the roles):
    x  (M,)    Spec("y"):       core (py, px) holds x[py block] (Mt), the same on every px;
    W  (M, N)  Spec("y", "x"):  core (py, px) holds W[py block, px block] (Mt x Nt);
    y  (N,)    Spec("x"):       core (py, px) ends with y[px block] (Nt), on every py.

Per core: the local partial GEMV ``res = x_blk . W_blk`` (Mt x Nt FMACs, one vector FMAC
call per row of the block), then an allreduce of ``res`` along ``axis``: the K-tree by
default, or the ``pipeline``/``ring``/``chain`` baselines. Without ``broadcast`` only the
root core of each line holds the result.

Messages per step: those of the allreduce (one flow per core at most).
"""

from __future__ import annotations

from ..errors import ProtocolError
from ..mesh import Mesh
from ..protocol import protocol
from ..transfer import Route
from .allreduce import allreduce_routes, run_allreduce


def _routes(mesh: Mesh, *, x: str, w: str, out: str, axis: str = "y", algo: str = "ktree", K: int = 2,
            group_num: int | None = None, broadcast: bool = True) -> list[Route]:
    return allreduce_routes(mesh, axis=axis, algo=algo, K=K, group_num=group_num, broadcast=broadcast)


def local_gemv(tile, x: str, w: str, out: str) -> None:
    """res = x_blk . W_blk on every core of the tile (one batched matmul), charged per core."""
    bx, bw, bo = (tile.buffers[n] if n in tile.buffers else None for n in (x, w, out))
    for name, buf in ((x, bx), (w, bw), (out, bo)):
        if buf is None:
            raise ProtocolError(f"mesh_gemv: no buffer {name!r} on tile {tile.index}; load it (or alloc it) first")
    mt, nt = bw.block if len(bw.block) == 2 else (None, None)
    if bx.block != (mt,) or bo.block != (nt,):
        raise ProtocolError(
            f"mesh_gemv: blocks do not match: x {bx.block}, W {bw.block}, out {bo.block}; "
            f"expected x (Mt,), W (Mt, Nt), out (Nt,)"
        )
    if not tile.cost_only:
        xs, ws = tile.data(x), tile.data(w)
        tile.data(out)[...] = (xs[:, :, None, :] @ ws)[:, :, 0, :]  # (h, w, Nt)
    tile.charge(mt * nt, bw.dtype.name, calls=mt, maps=1)


@protocol(routes=_routes)
async def mesh_gemv(tile, *, x: str, w: str, out: str, axis: str = "y", algo: str = "ktree", K: int = 2,
                    group_num: int | None = None, broadcast: bool = True) -> None:
    """Compute ``out = x . w`` with the partial sums reduced along ``axis`` by ``algo``."""
    local_gemv(tile, x, w, out)
    await run_allreduce(tile, buffer=out, axis=axis, op="add", algo=algo, K=K, group_num=group_num, broadcast=broadcast)
