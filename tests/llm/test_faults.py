"""Lost tiles and nodes mid-decode, with real killed processes on a real 3-node Ray cluster:
the wafer is started again on the survivors, the sequence replayed, and the tokens and
predicted cycles are those of an uninterrupted run."""

from __future__ import annotations

import os
import signal
import weakref

import pytest
import ray

from llm.checkpoint import random_weights
from llm.converted import convert
from llm.engine import WaferLlama
from llm.generate import generate
from llm.models import FromFile, load_model
from wafer_actors import TileLost
from wafer_actors.device import preset
from wafer_actors.fabric.ray import NAMESPACE

from .test_hf import write_hf
from .test_wafer_decode import TINY

pytestmark = pytest.mark.cluster

PROMPT = [3, 14, 15, 9]
NEW = 6
KILL_AT = len(PROMPT) + 2  # when the third new token is chosen: six tokens fed, mid-decode


def run(transport, *, prefill="token", fault=None, on_failure="recover", snapshot_every=0, converted=None,
        weights=None):
    """Greedy generation on tiles 1x3 (one per node on the cluster); ``fault(engine)`` strikes at KILL_AT.
    ``converted``: the tiles read the weights from this conversion of the same model; ``weights``: a loader of it."""
    args = dict(transport=transport, tokens=len(PROMPT) + NEW, prefill_tokens=len(PROMPT), on_failure=on_failure,
                snapshot_every=snapshot_every)
    if converted:
        engine = WaferLlama.from_converted(converted, **args)
    else:
        engine = WaferLlama(TINY, weights or random_weights(TINY, seed=5), mesh=(6, 6), tiles=(1, 3), **args)
    with engine as m:
        def on_token(i, _tok):
            if fault and i == KILL_AT:
                fault(m)

        out = generate(m, PROMPT, max_new_tokens=NEW, prefill=prefill, on_token=on_token)
        nodes = m.wafer.nodes()
        return out, [s.cycles for s in m.totals.steps], m.recoveries, nodes


def tile_actor(m, tile):
    return ray.get_actor(m.wafer.transport.tile_name(tile), namespace=NAMESPACE)


def ray_kill(m):
    ray.kill(tile_actor(m, 1))


def kill_9(m):
    os.kill(m.wafer.transport.pids()[1], signal.SIGKILL)


@pytest.mark.parametrize("prefill", ["token", "mesh"])
@pytest.mark.parametrize("fault", [ray_kill, kill_9], ids=["ray.kill", "kill -9"])
def test_a_killed_tile_is_replaced_and_the_run_is_unchanged(ray_cluster_3_nodes, fault, prefill):
    base, base_cycles, _, _ = run("local", prefill=prefill)
    out, cycles, recoveries, nodes = run("ray", prefill=prefill, fault=fault)
    assert out.output_ids == base.output_ids
    assert cycles == base_cycles
    assert (out.ttft_cycles, out.decode_cycles) == (base.ttft_cycles, base.decode_cycles)
    assert len(recoveries) == 1
    lost = recoveries[0]
    assert lost.tile == 1 and lost.replayed_tokens == KILL_AT
    assert "died" in lost.reason and lost.host_s > 0
    assert len(set(nodes)) == 3  # the node kept its place: only the process was lost


def test_a_lost_tile_of_a_converted_model_reads_its_shard_again(ray_cluster_3_nodes, tmp_path):
    """The replacement tile reads its weights from the conversion's shard, not from the driver (which holds none)."""
    base, base_cycles, _, _ = run("local")
    convert(TINY, random_weights(TINY, seed=5), None, tmp_path / "conv", mesh=(6, 6), device=preset("wse2"),
            tiles=(1, 3), tokens=len(PROMPT) + NEW, prefill_tokens=len(PROMPT))
    out, cycles, recoveries, _ = run("ray", fault=kill_9, converted=tmp_path / "conv")
    assert out.output_ids == base.output_ids
    assert cycles == base_cycles
    assert [r.tile for r in recoveries] == [1]


def test_a_lost_tile_of_a_model_read_from_its_file_reads_the_file_again(ray_cluster_3_nodes, tmp_path):
    """Given a loader (as ``generate`` gives it), the host drops the weights once the tiles hold them and a
    recovery reads the checkpoint file again."""
    base, base_cycles, _, _ = run("local")
    write_hf(tmp_path, TINY, random_weights(TINY, seed=5))
    cfg, w, _ = load_model(str(tmp_path))
    held = weakref.ref(w)
    loader = FromFile(str(tmp_path), w)
    del w

    def fault(m):
        assert held() is None  # nothing on the host keeps the weights read at the start
        kill_9(m)

    out, cycles, recoveries, _ = run("ray", fault=fault, weights=loader)
    assert out.output_ids == base.output_ids
    assert cycles == base_cycles
    assert [r.tile for r in recoveries] == [1]


@pytest.mark.parametrize("prefill, every, replayed", [("token", 4, 2), ("mesh", 2, 0), ("mesh", 4, KILL_AT)])
def test_a_snapshot_shortens_the_replay_and_changes_nothing(ray_cluster_3_nodes, prefill, every, replayed):
    """The recovery restores the last snapshot and replays only the steps after it (6 decode steps before the
    fault feeding the prompt token by token, 2 after a mesh prefill: with none yet, all of it again)."""
    base, base_cycles, _, _ = run("local", prefill=prefill)
    out, cycles, recoveries, _ = run("ray", prefill=prefill, fault=kill_9, snapshot_every=every)
    assert out.output_ids == base.output_ids
    assert cycles == base_cycles
    assert [r.replayed_tokens for r in recoveries] == [replayed]


def test_tile_names_show_in_ray(ray_cluster_3_nodes):
    w = random_weights(TINY, seed=5)
    with WaferLlama(TINY, w, mesh=(6, 6), tiles=(1, 3), transport="ray", tokens=2) as m:
        name = m.wafer.transport.name
        listed = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == NAMESPACE}
        assert {f"{name}/tile-{i}" for i in range(3)} <= listed
        assert name.startswith("wafer-")


def test_on_failure_fail_names_the_lost_tile(ray_cluster_3_nodes):
    with pytest.raises(TileLost, match=r"tile 1 \(on node \w+\) was lost: .*died.*\(actor wafer-\w+/tile-1\)"):
        run("ray", fault=kill_9, on_failure="fail")


def test_a_planned_migration_moves_tiles_while_decode_goes_on(ray_cluster_3_nodes):
    """Tiles 1 and 2 move onto tile 0's node after the second new token: the same tokens and cycles, the tiles
    on the new node under new names, the old actors gone, a pause reported."""
    moved = {}

    def migrate(m):
        t = m.wafer.transport
        moved["before"] = [t.tile_name(i) for i in range(3)]
        m.migrate(m.wafer.nodes()[0], tiles=[1, 2])

    base, base_cycles, _, _ = run("local")
    w = random_weights(TINY, seed=5)
    with WaferLlama(TINY, w, mesh=(6, 6), tiles=(1, 3), transport="ray", tokens=len(PROMPT) + NEW) as m:
        out = generate(m, PROMPT, max_new_tokens=NEW,
                       on_token=lambda i, _t: migrate(m) if i == KILL_AT else None)
        m.finish_migration()  # if the background copy outlasted the decode
        nodes, t = m.wafer.nodes(), m.wafer.transport
        names = [t.tile_name(i) for i in range(3)]
        cycles = [s.cycles for s in m.totals.steps]
        assert len(set(nodes)) == 1 and not m.recoveries
        assert [g.tiles for g in m.migrations] == [(1, 2)] and m.migrations[0].pause_s > 0
        listed = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == NAMESPACE}
        assert names[1:] == [moved["before"][1] + "@1", moved["before"][2] + "@1"] and set(names) <= listed
        assert not set(moved["before"][1:]) & listed
    assert out.output_ids == base.output_ids
    assert cycles == base_cycles
