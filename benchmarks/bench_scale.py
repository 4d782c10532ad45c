"""Scaling on a multi-node Ray cluster: strong and weak GEMV, strong decode of the default model.

With ``--local-nodes N`` it starts N raylets on this machine (``ray.cluster_utils.Cluster``);
otherwise it joins ``--address``. On one machine the speedup is bounded by its cores; what
must hold anyway is the traffic split (inside vs across nodes) and invariance of results
and predicted cycles.

    python benchmarks/bench_scale.py --local-nodes 3 [--json scale.json] [--plot scale.png]
"""

from __future__ import annotations

import argparse
import json

import ray

from llm import scale


def show(rows: list[dict]) -> None:
    print(f"{rows[0]['mode']} {rows[0]['workload']}:")
    print(f"{'tiles':>5} {'mesh':>9} {'nodes':>5} {'wall s':>8} {'speedup':>7} {'effic.':>6} {'msgs in':>8} {'across':>7} "
          f"{'MB in':>7} {'MB across':>9} {'cycles':>10} invariant")
    for r in rows:
        print(f"{r['tiles']:>5} {r['mesh'][0]:>4}x{r['mesh'][1]:<4} {r['nodes']:>5} {r['wall_s']:>8.2f} {r['speedup']:>7.2f} "
              f"{r['efficiency']:>6.2f} {r['messages_inside_nodes']:>8} {r['messages_across_nodes']:>7} "
              f"{r['bytes_inside_nodes'] / 1e6:>7.2f} {r['bytes_across_nodes'] / 1e6:>9.2f} {r['cycles']:>10,.0f} {r['invariant']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--local-nodes", type=int, default=3)
    ap.add_argument("--address", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None)
    args = ap.parse_args()
    cluster = None
    if args.address:
        ray.init(address=args.address, log_to_driver=False)
    else:
        from ray.cluster_utils import Cluster

        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
        for _ in range(args.local_nodes - 1):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
    print(f"{len([n for n in ray.nodes() if n['Alive']])} Ray nodes")
    results = []
    for mode, counts, workload, opts in (
        ("strong", [1, 2, 4, 8], "gemv", dict(side=128, per_core=16)),
        ("weak", [1, 4, 16], "gemv", dict(side=32, per_core=16)),
        ("strong", [1, 3], "decode", dict(side=64, tokens=2)),
    ):
        rows = scale.run(mode, counts, workload, **opts)
        show(rows)
        results += rows
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    if args.plot:
        scale.plot([r for r in results if r["mode"] == "strong" and r["workload"] == "gemv"], args.plot)
    ray.shutdown()
    if cluster:
        cluster.shutdown()


if __name__ == "__main__":
    main()
