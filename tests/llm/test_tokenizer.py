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
