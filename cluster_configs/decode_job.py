"""Job entry point: decode on the Ray cluster this script runs in, tiles spread over its nodes.

    ray submit cluster_configs/<cfg>.yaml cluster_configs/decode_job.py -- --mesh 64x64 --tiles 1x3
    ray job submit --working-dir . -- python cluster_configs/decode_job.py --mesh 64x64 --tiles 1x3

Arguments are those of ``wafer-llm generate`` (``--prompt`` defaults to a fixed question);
the JSON report goes to stdout's last line and to ``--json`` if given. The configs here
start Ray with token authentication and put the token in ``~/.ray/auth_token`` on every
node; ``ray submit`` runs this script on the head without ``RAY_AUTH_MODE``, so where that
file exists and no mode is set, token mode is used.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from llm.cli import main

if __name__ == "__main__":
    if "RAY_AUTH_MODE" not in os.environ and (Path.home() / ".ray" / "auth_token").exists():
        os.environ["RAY_AUTH_MODE"] = "token"
    args = sys.argv[1:]
    if "--prompt" not in args and "--chat" not in args:
        args += ["--chat", "What is the capital of France?"]
    if "--address" not in args:
        args += ["--address", "auto"]
    sys.exit(main(["generate", *args]))
