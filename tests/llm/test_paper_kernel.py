"""The paper kernel: the authors' decode configurations (reference section 7.1) and what the emulator builds from them."""

from __future__ import annotations

import dataclasses

import pytest

from llm.calibration import decode_layer
from llm.config import preset
from llm.engine import WaferLlama
from llm.paper_kernel import group_num, paper_config, paper_shape
from wafer_actors.device import resolve

# (P, dim, ffn_dim, seq_len, group_num) of the authors' llama8B_4k_1_P configurations, section 7.1
LISTED = [(300, 4200, 14400, 4200, 15), (360, 4320, 14400, 4320, 18), (420, 4200, 14700, 4200, 20),
          (480, 4320, 14400, 4320, 20), (540, 4320, 14580, 4320, 20), (600, 4200, 14400, 4200, 24),
          (660, 4620, 14520, 4620, 22), (720, 4320, 14400, 4320, 24)]


@pytest.mark.parametrize("p, dim, ffn, seq, groups", LISTED)
def test_the_rounding_rule_reproduces_the_listed_configurations(p, dim, ffn, seq, groups):
    unlisted = dataclasses.replace(preset("llama3-8b"), name="llama3-8b-copy")  # not in the table: the rule alone
    shape = paper_shape(unlisted, p)
    assert (shape.dim, shape.ffn_dim, shape.seq_len, shape.group_num) == (dim, ffn, seq, groups)


def test_listed_exceptions_to_the_rule_are_kept():
    cfg = preset("llama3-8b")
    assert paper_shape(cfg, 240).dim == 4080  # rounded down in the authors' file, up by the rule
    assert paper_shape(cfg, 512).group_num == 32 and group_num(512) == 16


@pytest.mark.parametrize("p, d_pe, f_pe, groups", [(360, 12, 40, 18), (720, 6, 20, 24)])
def test_paper_kernel_places_one_head_with_full_kv_at_the_listed_shapes(p, d_pe, f_pe, groups):
    cfg = preset("llama3-8b")
    shape = paper_shape(cfg, p)
    paper = dataclasses.replace(paper_config(cfg, shape), n_layers=1)
    assert (paper.n_heads, paper.n_kv_heads, paper.head_dim, paper.kv_dim) == (1, 1, shape.dim, shape.dim)
    with WaferLlama(paper, None, mesh=(p, p), cost_only=True, dtype="float16", lm_head=False, tokens=shape.seq_len,
                    group_num=shape.group_num, transport="local") as m:
        s = m.placement.shape
        assert (s.dt, s.kvt, s.ft) == (d_pe, d_pe, f_pe)  # x, K, V and FFN blocks per core
        assert m.placement.cap * p >= shape.seq_len  # the whole rounded sequence has room in the cache
        assert m.plans[0].group_num == groups


def test_the_paper_kernel_costs_differ_from_the_real_model():
    cfg, dev = preset("llama3-8b"), resolve("wse2")
    paper, _, _ = decode_layer(cfg, dev, 360, kernel="paper")
    faithful, _, _ = decode_layer(cfg, dev, 360, kernel="faithful")
    assert paper != faithful
    with pytest.raises(ValueError, match="kernel must be one of paper, faithful"):
        decode_layer(cfg, dev, 360, kernel="papers")
    with pytest.raises(ValueError, match="paper kernel is a timing configuration: it runs with cost_only=True"):
        WaferLlama(cfg, None, mesh=(360, 360), transport="local", kernel="paper")
