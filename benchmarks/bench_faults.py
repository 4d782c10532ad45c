"""Faults mid-decode on a 3-node local Ray cluster: how fast a lost tile is noticed and the run recovered.

For each fault (``ray.kill`` of a tile actor, ``kill -9`` of its worker process, the same
with snapshots, removal of a worker node) and a planned migration of one tile to another node, greedy decode of the default model on tiles 1x3 (one per node) is struck
after a few tokens; the table gives the seconds from the fault until it is noticed, the
host seconds of the recovery (wafer started again and weights placed; sequence replayed),
and whether the tokens and predicted cycles equal an uninterrupted run; for the migration,
how long decode paused.

    python benchmarks/bench_faults.py [--mesh 64x64] [--new 6] [--kill-at 3]
"""

from __future__ import annotations

import argparse
import os
import signal
import time

import ray
from ray.cluster_utils import Cluster

from llm.engine import WaferLlama
from llm.generate import generate
from llm.models import load_model
from wafer_actors.fabric.ray import NAMESPACE
from wafer_actors.mesh import parse_grid


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mesh", default="64x64")
    ap.add_argument("--new", type=int, default=6, help="new tokens generated")
    ap.add_argument("--kill-at", type=int, default=3, help="strike when this many new tokens are chosen")
    ap.add_argument("--snapshot-every", type=int, default=4, help="steps between snapshots in the snapshot row")
    args = ap.parse_args()
    cfg, w, tok = load_model()
    prompt = tok.encode("The capital of France is")
    mesh = parse_grid(args.mesh)
    strike = len(prompt) + args.kill_at - 1

    def run(transport: str, fault=None, snapshot_every: int = 0):
        with WaferLlama(cfg, w, mesh=mesh, tiles=(1, 3), transport=transport, tokens=len(prompt) + args.new,
                        snapshot_every=snapshot_every) as m:
            struck = []

            def on_token(i: int, _t: int) -> None:
                if fault and i == strike:
                    struck.append(time.time())
                    fault(m)

            out = generate(m, prompt, max_new_tokens=args.new, on_token=on_token)
            m.finish_migration()
            return out.output_ids, [s.cycles for s in m.totals.steps], struck, m.recoveries, m.migrations, m.snapshot_s

    base_ids, base_cycles, *_ = run("local")
    rows = []
    moves = []
    for name in ("ray.kill", "kill -9", "kill -9, snapshots", "node removal", "migration"):
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
        workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)

        def fault(m, name=name, workers=workers, cluster=cluster):
            t = m.wafer.transport
            if name == "ray.kill":
                ray.kill(ray.get_actor(t.tile_name(1), namespace=NAMESPACE))
            elif name.startswith("kill -9"):
                os.kill(t.pids()[1], signal.SIGKILL)
            elif name == "migration":  # tile 1 onto tile 0's node, planned
                m.migrate(t.nodes()[0], tiles=[1])
            else:
                cluster.remove_node(next(n for n in workers if n.node_id == t.nodes()[2]))

        every = args.snapshot_every if "snapshots" in name else 0
        ids, cycles, struck, recoveries, migrations, snapshot_s = run("ray", fault, every)
        if every:
            print(f"snapshots every {every} steps took {snapshot_s:.2f} s of host time in all")
        same = ids == base_ids and cycles == base_cycles
        if migrations:
            moves.append((migrations[0], same))
        else:
            rows.append((name, recoveries[0].noticed_at - struck[0], recoveries, same))
        ray.shutdown()
        cluster.shutdown()
    print(f"model {cfg.name}, mesh {mesh[0]}x{mesh[1]}, tiles 1x3 over 3 nodes, {args.new} new tokens, struck at new token "
          f"{args.kill_at}")
    print(f"{'fault':>14} {'noticed (s)':>12} {'restart (s)':>12} {'replay (s)':>11} {'replayed':>9} {'recoveries':>11} "
          f"{'tokens+cycles identical':>24}")
    for name, noticed, recoveries, same in rows:
        print(f"{name:>14} {noticed:>12.2f} {sum(r.restart_s for r in recoveries):>12.2f} "
              f"{sum(r.replay_s for r in recoveries):>11.2f} {sum(r.replayed_tokens for r in recoveries):>9} "
              f"{len(recoveries):>11} {str(same):>24}")
    for mig, same in moves:
        print(f"planned migration of tile(s) {list(mig.tiles)}: buffers copied in the background for "
              f"{mig.background_s - mig.pause_s:.2f} s while decode went on, pause {1e3 * mig.pause_s:.0f} ms; "
              f"tokens+cycles identical: {same}")


if __name__ == "__main__":
    main()
