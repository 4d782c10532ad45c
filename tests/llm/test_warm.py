"""``warm_up`` compiles every loop a mesh prefill and decode meet, so a run on a cold cache finds them all saved."""

from __future__ import annotations

import os
import subprocess
import sys

WARM = "from llm.warm import warm_up; [p.wait() for p in warm_up('shift', 'ktree', 'fused', 'mesh')]"
RUN = """
from numba.core.registry import CPUDispatcher
from llm.checkpoint import random_weights
from llm.config import LlamaConfig
from llm.engine import WaferLlama
from llm.generate import generate
from wafer_actors import kernels, program, timing

cfg = LlamaConfig("other", 2, 64, 96, 4, 2, 16, 520)  # other shapes, mesh and prompt than the warm-up's
with WaferLlama(cfg, random_weights(cfg, seed=1), mesh=(8, 8), transport="local", kv="shift", algo="ktree",
                tokens=6, prefill_tokens=4) as m:
    generate(m, [3, 1, 4, 1], max_new_tokens=3, prefill="mesh")
dispatchers = [d for mod in (kernels, program, timing) for d in vars(mod).values() if isinstance(d, CPUDispatcher)]
print(sum(bool(d.stats.cache_hits or d.stats.cache_misses) for d in dispatchers))  # loops met
print(sum(sum(d.stats.cache_misses.values()) for d in dispatchers))  # signatures compiled here
"""


def test_a_prefill_and_decode_after_the_warm_up_compile_nothing(tmp_path):
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    subprocess.run([sys.executable, "-c", WARM], env=env, check=True, timeout=600)
    out = subprocess.run([sys.executable, "-c", RUN], env=env, check=True, timeout=600, capture_output=True,
                         text=True).stdout.splitlines()
    met, compiled = (int(n) for n in out[-2:])
    assert met >= 20  # the prefill's GEMM kernels, decode's vector kernels and the fused executor's loops, from the cache
    assert compiled == 0
