"""Tokenizers built with ``tokenizers`` from GGUF metadata (a byte-level BPE, or SentencePiece's BPE)
or from a ``tokenizer.json``.

Control tokens (``<|im_start|>``, ``<|endoftext|>``, ...) are special tokens: written in
the prompt text they become their own ids instead of being split into bytes. A GGUF file
names its pre-tokenizer (``tokenizer.ggml.pre``: how text is split into words before BPE);
``PRE_TOKENIZERS`` holds the split rules of the ones implemented, as llama.cpp applies them.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from .errors import CheckpointError

NORMAL, CONTROL, BYTE = 1, 3, 6  # GGUF token types

# Split rules of GGUF pre-tokenizers (llama.cpp's, case-insensitive contractions spelled out)
_CONTRACTIONS = "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_WORDS = r"[^\r\n\p{L}\p{N}]?\p{L}+|{digits}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
PRE_TOKENIZERS = {
    "smollm": None,  # digits one by one, then GPT-2's split (ByteLevel's own regex)
    "llama-bpe": _CONTRACTIONS + "|" + _WORDS.replace("{digits}", r"\p{N}{1,3}"),  # digits in threes
    "qwen2": _CONTRACTIONS + "|" + _WORDS.replace("{digits}", r"\p{N}"),  # digits one by one
}


class Tokenizer:
    """Encode text to ids and back.

    Attributes:
        bos_id, eos_id: beginning- and end-of-sequence ids.
        chat_template: the model's Jinja chat template, if the file has one.
        add_bos, add_eos: a plain prompt starts with BOS / ends with EOS (the file's ``add_bos_token`` /
            ``add_eos_token``).
        stop_ids: tokens that end generation: EOS and the file's other end tokens (end of turn, of message).
    """

    def __init__(self, backend, bos_id: int, eos_id: int, chat_template: str | None, add_bos: bool = False,
                 add_eos: bool = False, stop_ids: frozenset[int] = frozenset()):
        self.backend, self.bos_id, self.eos_id, self.chat_template = backend, bos_id, eos_id, chat_template
        self.add_bos, self.add_eos = add_bos, add_eos
        self.stop_ids = frozenset(stop_ids) | {eos_id}

    @classmethod
    def from_gguf(cls, reader, path: str | Path = "model") -> "Tokenizer":
        """Build the tokenizer a GGUF file describes (``tokenizer.ggml.model``: ``gpt2`` with a pre-tokenizer of
        ``PRE_TOKENIZERS``, or ``llama``, SentencePiece's BPE).

        Raises:
            CheckpointError: another tokenizer model or pre-tokenizer, or missing vocabulary.
        """
        from tokenizers import AddedToken

        def strings(key: str) -> list[str]:
            field = _field(reader, key, path)
            return [bytes(field.parts[i]).decode("utf-8") for i in field.data]

        def scalar(key: str, default=None):
            field = reader.fields.get(key)
            return default if field is None else field.parts[field.data[0]].tolist()[0]

        kind = bytes(reader.fields["tokenizer.ggml.model"].parts[-1]).decode() if "tokenizer.ggml.model" in reader.fields else None
        tokens = strings("tokenizer.ggml.tokens")
        types_field = reader.fields.get("tokenizer.ggml.token_type")
        types = [int(types_field.parts[i][0]) for i in types_field.data] if types_field else [NORMAL] * len(tokens)
        if kind == "gpt2":
            pre = bytes(reader.fields["tokenizer.ggml.pre"].parts[-1]).decode() if "tokenizer.ggml.pre" in reader.fields else None
            pre = pre or "smollm"  # files written before the key existed
            if pre not in PRE_TOKENIZERS:
                raise CheckpointError(f"{path}: pre-tokenizer tokenizer.ggml.pre {pre!r} is not supported "
                                      f"(only {', '.join(map(repr, PRE_TOKENIZERS))}): it would split text differently")
            backend = _byte_level_bpe(tokens, [tuple(m.split(" ", 1)) for m in strings("tokenizer.ggml.merges")], pre)
        elif kind == "llama":
            scores_field = _field(reader, "tokenizer.ggml.scores", path)
            scores = [float(scores_field.parts[i][0]) for i in scores_field.data]
            backend = _sentencepiece_bpe(tokens, scores, types, int(scalar("tokenizer.ggml.unknown_token_id", 0)),
                                         bool(scalar("tokenizer.ggml.add_space_prefix", True)))
        else:
            raise CheckpointError(f"{path}: tokenizer model tokenizer.ggml.model {kind!r} is not supported "
                                  "(only 'gpt2', a byte-level BPE, and 'llama', SentencePiece's BPE)")
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == CONTROL])
        template = reader.fields.get("tokenizer.chat_template")
        ends = {int(scalar(f"tokenizer.ggml.{k}_token_id")) for k in ("eot", "eom") if f"tokenizer.ggml.{k}_token_id" in reader.fields}
        return cls(
            backend,
            bos_id=int(scalar("tokenizer.ggml.bos_token_id", 1)),
            eos_id=int(scalar("tokenizer.ggml.eos_token_id", 2)),
            chat_template=None if template is None else bytes(template.parts[template.data[0]]).decode("utf-8"),
            add_bos=bool(scalar("tokenizer.ggml.add_bos_token", False)),
            add_eos=bool(scalar("tokenizer.ggml.add_eos_token", False)),
            stop_ids=frozenset(ends),
        )

    @classmethod
    def from_hf(cls, path: str | Path) -> "Tokenizer":
        """Build the tokenizer of a Hugging Face directory (``tokenizer.json``, ids and template from
        ``tokenizer_config.json`` / ``config.json``, end tokens also from ``generation_config.json``).

        Raises:
            CheckpointError: no readable ``tokenizer.json``.
        """
        import json

        from tokenizers import Tokenizer as Backend

        path = Path(path)
        try:
            backend = Backend.from_file(str(path / "tokenizer.json"))
        except Exception as err:  # tokenizers raises a bare Exception for a bad file
            raise CheckpointError(f"cannot read {path / 'tokenizer.json'}: {err}") from err

        def read(name: str) -> dict:
            f = path / name
            return json.loads(f.read_text()) if f.exists() else {}

        tc, cfg, gen = read("tokenizer_config.json"), read("config.json"), read("generation_config.json")

        def token_id(key: str, default: int) -> int:
            tok = tc.get(key)
            if isinstance(tok, dict):
                tok = tok.get("content")
            if isinstance(tok, str) and backend.token_to_id(tok) is not None:
                return int(backend.token_to_id(tok))
            return int(cfg.get(f"{key}_id", default) or default)

        ends = set()
        for source in (cfg, gen):  # an id or a list of ids
            value = source.get("eos_token_id")
            ends |= set(value if isinstance(value, list) else [] if value is None else [value])
        return cls(backend, token_id("bos_token", 1), token_id("eos_token", 2), tc.get("chat_template"),
                   add_bos=bool(tc.get("add_bos_token", False)), add_eos=bool(tc.get("add_eos_token", False)),
                   stop_ids=frozenset(int(i) for i in ends))

    def save(self, path: str | Path) -> None:
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` into the directory ``path`` (read by ``from_hf``)."""
        path = Path(path)
        self.backend.save(str(path / "tokenizer.json"))
        token = lambda i: self.backend.id_to_token(i)  # noqa: E731
        config = {"bos_token": token(self.bos_id), "eos_token": token(self.eos_id), "add_bos_token": self.add_bos,
                  "add_eos_token": self.add_eos}
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        (path / "tokenizer_config.json").write_text(json.dumps(config, indent=1, ensure_ascii=False))
        (path / "generation_config.json").write_text(json.dumps({"eos_token_id": sorted(self.stop_ids)}))

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; special tokens written in it are parsed as such."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of a plain prompt: BOS first and EOS last where the file asks for them (``add_bos_token``,
        ``add_eos_token``), as llama.cpp and transformers do. A chat template writes its own BOS, so its text goes
        through ``encode``."""
        return ([self.bos_id] if self.add_bos else []) + self.encode(text) + ([self.eos_id] if self.add_eos else [])

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``, special tokens included."""
        return self.backend.decode(list(ids), skip_special_tokens=False)

    def chat(self, user: str) -> str:
        """Wrap one user message in the model's chat template (ChatML for SmolLM2).

        Raises:
            CheckpointError: the template fails, or tries to reach Python internals (see ``render_chat``).
        """
        if self.chat_template is None:
            return user
        token = lambda i: self.backend.id_to_token(i) or ""  # noqa: E731
        return render_chat(self.chat_template, [{"role": "user", "content": user}], bos_token=token(self.bos_id),
                           eos_token=token(self.eos_id))


def _field(reader, key: str, path):
    field = reader.fields.get(key)
    if field is None:
        raise CheckpointError(f"{path}: metadata key {key!r} is missing")
    return field


def _byte_level_bpe(tokens: list[str], merges: list[tuple[str, str]], pre: str):
    """GPT-2 style BPE over bytes shown as characters, words split by the pre-tokenizer ``pre`` (of
    ``PRE_TOKENIZERS``) first."""
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as Backend

    # Llama 3 takes a word that is in the vocabulary whole, without merging (llama.cpp's ignore_merges)
    backend = Backend(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False,
                                 ignore_merges=pre == "llama-bpe"))
    if PRE_TOKENIZERS[pre] is None:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
        )
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(PRE_TOKENIZERS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_bpe(tokens: list[str], scores: list[float], types: list[int], unk: int, space_prefix: bool):
    """SentencePiece's BPE (Llama 2, TinyLlama): spaces as U+2581 (one before the text, and after each special
    token, as llama.cpp does), the adjacent pair whose union scores highest merged first, characters the
    vocabulary lacks as their UTF-8 bytes (``<0xNN>`` tokens). As a merge list: every split of a token into
    two tokens, highest-scoring union first."""
    from tokenizers import decoders, models, normalizers
    from tokenizers import Tokenizer as Backend

    vocab = {t: i for i, t in enumerate(tokens)}
    pieces = {t for t, k in zip(tokens, types) if k != BYTE and k != CONTROL}
    merges = []
    for i in sorted(range(len(tokens)), key=lambda i: -scores[i]):
        t = tokens[i]
        if t in pieces:
            merges += [(t[:k], t[k:]) for k in range(1, len(t)) if t[:k] in pieces and t[k:] in pieces]
    backend = Backend(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, fuse_unk=True, unk_token=tokens[unk]))
    space = [normalizers.Prepend("▁")] if space_prefix else []
    backend.normalizer = normalizers.Sequence(space + [normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
                                        + ([decoders.Strip(" ", 1, 0)] if space_prefix else []))
    return backend


def render_chat(template: str, messages: list[dict[str, str]], **special: str) -> str:
    """Render a chat template from a checkpoint with the generation prompt, as transformers does.

    The template is data from a file, not code we trust: it runs in Jinja's immutable
    sandbox (no attribute of Python internals, no mutation of what it is given), with
    transformers' options (``trim_blocks``, ``lstrip_blocks``, loop controls) and helpers
    (``raise_exception``, ``strftime_now``, a ``tojson`` that keeps non-ASCII text).

    Raises:
        CheckpointError: the template is refused (it reached for internals) or fails.
    """
    import jinja2
    import jinja2.sandbox

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def tojson(value, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys: bool = False) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                      extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=True, **special)
    except jinja2.sandbox.SecurityError as err:
        raise CheckpointError(f"the chat template tried to reach Python internals ({err}); refused: a template is data, "
                              "and only the sandbox's safe operations are allowed") from None
    except jinja2.TemplateError as err:
        raise CheckpointError(f"the chat template failed: {err}") from None
