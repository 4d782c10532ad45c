"""Model fixtures: the default GGUF is read once per test session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def smollm2():
    """(config, weights, reader) of the default model, SmolLM2-135M-Instruct (Q4_1 GGUF)."""
    from llm.checkpoint import default_model_path, load_gguf

    return load_gguf(default_model_path())


@pytest.fixture(scope="session")
def tokenizer(smollm2):
    from llm.tokenizer import Tokenizer

    return Tokenizer.from_gguf(smollm2[2])
