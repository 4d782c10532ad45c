"""The tokenizer read from the GGUF, and chat templates rendered in the sandbox."""

import pytest

from llm.errors import CheckpointError
from llm.tokenizer import render_chat


def test_text_round_trips(tokenizer):
    """Encoding then decoding gives the text back, digits split one by one."""
    for text in ["Hello world!", "The year 2024 has 366 days.", "naïve café ☕", "  two  spaces"]:
        assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.encode("Hello world!") == [19556, 905, 17]
    assert len(tokenizer.encode("2024")) == 4


def test_special_tokens_in_the_prompt_are_single_ids(tokenizer):
    """<|im_start|> and <|im_end|> written in text become their own ids, not bytes."""
    ids = tokenizer.encode("<|im_start|>user\nHi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert tokenizer.eos_id == 2


def test_chat_template_wraps_the_message(tokenizer):
    """--chat applies the model's ChatML template with the generation prompt."""
    text = tokenizer.chat("What is 2+2?")
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")


def test_a_template_reaching_python_internals_is_refused(tmp_path):
    """A chat template is data from the file: one that climbs from a Jinja global to ``os.system`` is refused with
    a clear error, and the command never runs."""
    marker = tmp_path / "pwned"
    for attack in ("{{ cycler.__init__.__globals__.os.system('touch %s') }}",
                   "{{ ''.__class__.__mro__[1].__subclasses__() }}{{ joiner.__init__.__globals__.os.system('touch %s') }}",
                   "{% set x = messages.append({'role': 'x'}) %}touch %s"):
        with pytest.raises(CheckpointError, match="Python internals|unsafe|immutable"):
            render_chat(attack.replace("%s", str(marker)), [{"role": "user", "content": "hi"}])
    assert not marker.exists()


def test_templates_render_with_the_options_transformers_uses():
    """trim_blocks and lstrip_blocks (block tags leave no newline or indent), loop controls, tojson without
    escaping non-ASCII text, and raise_exception as a clear error."""
    template = ("{% for m in messages %}\n"
                "    {% if m.role == 'system' %}{% continue %}{% endif %}\n"
                "<{{ m.role }}>{{ m.content | tojson }}\n"
                "{% endfor %}\n"
                "{% if add_generation_prompt %}<assistant>{% endif %}")
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "café"}]
    assert render_chat(template, messages) == '<user>"café"\n<assistant>'
    with pytest.raises(CheckpointError, match="the chat template failed: only user turns"):
        render_chat("{{ raise_exception('only user turns') }}", messages)


def test_other_gguf_pre_tokenizers_are_refused(tmp_path):
    """A pre-tokenizer not implemented here would split text by other rules: refused by name, not tokenized wrong."""
    from llm.checkpoint import load_gguf
    from llm.tokenizer import Tokenizer

    from .test_checkpoint import write_gguf

    path = write_gguf(tmp_path / "m.gguf", extra=lambda w: w.add_string("tokenizer.ggml.pre", "deepseek-llm"))
    with pytest.raises(CheckpointError, match="tokenizer.ggml.pre 'deepseek-llm' is not supported"):
        Tokenizer.from_gguf(load_gguf(path)[2], path)


def test_bos_comes_first_where_the_file_asks_for_it(tmp_path, tokenizer):
    """``add_bos_token`` (here in a tokenizer_config.json) puts BOS before a plain prompt; SmolLM2's GGUF says no."""
    import json

    from llm.tokenizer import Tokenizer

    tokenizer.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True, "bos_token": "<|endoftext|>"}))
    hf = Tokenizer.from_hf(tmp_path)
    bos = tokenizer.backend.token_to_id("<|endoftext|>")
    assert hf.add_bos and hf.encode_prompt("Hello world!") == [bos, *tokenizer.encode("Hello world!")]
    assert not tokenizer.add_bos and tokenizer.encode_prompt("Hello world!") == tokenizer.encode("Hello world!")
