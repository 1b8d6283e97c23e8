"""The board-side generate.py of target/app/ (bench/lm_app.py): its chat prompt, rendered without transformers."""
import pytest


def test_the_board_app_renders_a_chat_prompt_as_transformers_does():
    pytest.importorskip("transformers")
    from edgekd.bench.lm_app import AppError, chat_text
    from tests.lm_fixtures import tiny_tokenizer

    tok = tiny_tokenizer()  # a ChatML template of the kind SmolLM2 and Qwen ship: a default system turn, trim_blocks
    tok.chat_template = (
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\nYou are helpful.<|im_end|>\n' }}{% endif %}"
        "{{'<|im_start|>' + message['role'] + '\n' + message['content'] | trim + '<|im_end|>' + '\n'}}"
        "{% endfor %}\n{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    bundle = {"tokenizer": {"chat_template": tok.chat_template, "special_tokens": dict(tok.special_tokens_map)}}
    prompt = "Write a function that reverses a list.  "
    expect = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    assert chat_text(bundle, prompt) == expect and expect.endswith("<|im_start|>assistant\n")
    with pytest.raises(AppError, match="refused the prompt \\(no users\\)"):
        chat_text({"tokenizer": {"chat_template": "{{ raise_exception('no users') }}"}}, prompt)
    with pytest.raises(AppError, match="has none"):
        chat_text({"tokenizer": {"chat_template": None}}, prompt)
