"""The board-side generate.py of target/app/ (bench/lm_app.py): its chat prompt, rendered without transformers."""
import pytest


def test_the_board_app_renders_a_chat_prompt_as_transformers_does():
    pytest.importorskip("transformers")
    from edgekd.bench.lm_app import AppError, chat_text, conversation
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
    assert chat_text(bundle, conversation(prompt)) == expect and expect.endswith("<|im_start|>assistant\n")
    talk = [{"role": "system", "content": "Answer in Python."}, {"role": "user", "content": "Reverse a list."},
            {"role": "assistant", "content": "xs[::-1]"}, {"role": "user", "content": "In place?"}]
    expect = tok.apply_chat_template(talk, tokenize=False, add_generation_prompt=True)
    assert chat_text(bundle, conversation(talk[1:], "Answer in Python.")) == expect
    assert "You are helpful." not in expect and expect.count("<|im_start|>") == 5  # its own system turn
    with pytest.raises(AppError, match="refused the prompt \\(no users\\)"):
        chat_text({"tokenizer": {"chat_template": "{{ raise_exception('no users') }}"}}, conversation(prompt))
    with pytest.raises(AppError, match="has none"):
        chat_text({"tokenizer": {"chat_template": None}}, conversation(prompt))


def test_a_messages_file_is_read_and_what_is_wrong_with_it_is_named(tmp_path):
    import json

    from edgekd.bench.lm_app import read_messages

    talk = [{"role": "user", "content": "Reverse a list."}, {"role": "assistant", "content": "xs[::-1]"},
            {"role": "user", "content": "In place?"}]
    path = tmp_path / "talk.json"
    path.write_text(json.dumps(talk))
    assert read_messages(str(path)) == talk
    path.write_text(json.dumps({"messages": talk}))  # a record of the JSON Lines chat data
    assert read_messages(str(path), "Be brief.") == [{"role": "system", "content": "Be brief."}, *talk]
    for content, words in ((talk[:2], "the last message is the assistant's"), ([], "expected a list of messages"),
                           ([{"role": "robot", "content": "x"}], "message 0 needs a role"),
                           ([{"role": "user", "content": 3}], "message 0 needs a role"),
                           ([{"role": "system", "content": "a"}, talk[0]], None)):
        path.write_text(json.dumps(content))
        if words is None:  # a system message of its own, and --system too
            with pytest.raises(ValueError, match="holds a system message already; leave out --system"):
                read_messages(str(path), "Be brief.")
            continue
        with pytest.raises(ValueError, match=words):
            read_messages(str(path))
    path.write_text("{not json")
    with pytest.raises(ValueError, match="is not JSON"):
        read_messages(str(path))
    with pytest.raises(ValueError, match="absent.json: No such file"):
        read_messages(str(tmp_path / "absent.json"))


def test_the_streamer_prints_whole_characters_as_tokens_come_and_stops_at_eos():
    import io

    from edgekd.bench.lm_app import Streamer

    pieces = {1: b"caf", 2: b"\xc3", 3: b"\xa9 ", 4: b"ok", 0: b"<eos>"}  # token 2 and 3 split one character

    def decode(ids):
        return b"".join(pieces[i] for i in ids).decode("utf-8", errors="replace")

    out = io.StringIO()
    s = Streamer(decode, eos=0, limit=10, out=out)
    s([1])
    assert out.getvalue() == "caf"
    s([2])  # half a character: held back
    assert out.getvalue() == "caf"
    s([3, 4])
    assert out.getvalue() == "café ok"
    s([0, 4])  # the end-of-text token ends it: nothing after it is shown
    assert out.getvalue() == "café ok" and s.ids == [1, 2, 3, 4] and s.done
    s.finish(decode(s.ids))
    assert out.getvalue() == "café ok\n"
    short = io.StringIO()
    t = Streamer(decode, eos=0, limit=2, out=short)
    t([1, 4, 4])  # no more than the limit
    assert short.getvalue() == "cafok" and t.ids == [1, 4]


def test_stop_strings_end_the_text_before_them_and_hold_back_what_could_start_one():
    import io

    from edgekd.bench.lm_app import Streamer

    pieces = {1: "def f", 2: "():\n", 3: "    pass\n", 4: "``", 5: "`\n", 6: "more", 7: "``x"}

    def decode(ids):
        return "".join(pieces[i] for i in ids)

    out = io.StringIO()
    s = Streamer(decode, eos=0, limit=20, out=out, stops=["```", "never"])
    assert not s([1, 2])
    assert out.getvalue() == "def f():\n"  # nothing here could start a stop string
    assert not s([3, 4])
    assert out.getvalue() == "def f():\n    pass\n"  # "``" could start "```": held back
    assert s([5, 6])  # the fence completes at token 5: the text ends before it, token 6 is dropped
    assert s.ids == [1, 2, 3, 4, 5] and s.text == "def f():\n    pass\n" and s.stop == "```" and s.done
    assert out.getvalue() == "def f():\n    pass\n"
    partial = io.StringIO()
    assert not Streamer(decode, eos=0, limit=20, out=partial, stops=["reX"])([6])
    assert partial.getvalue() == "mo"  # "re" could start "reX"
    s.finish(s.text)
    assert out.getvalue() == "def f():\n    pass\n\n"
    quiet = io.StringIO()
    first = Streamer(decode, eos=0, limit=20, out=quiet, stops=["x", "``"], show=False)
    assert first([1, 7]) and first.stop == "``" and first.text == "def f"  # the earliest in the text wins
    assert quiet.getvalue() == ""


def test_a_true_answer_from_on_tokens_ends_both_decode_loops():
    import numpy as np

    from edgekd.bench.lm_generation import continue_ids, speculative_greedy
    from tests.unit.test_lm_sampling import Bigram

    table = np.random.default_rng(2).normal(0, 2, (16, 16))
    target, draft = Bigram(table), Bigram(table + np.random.default_rng(3).normal(0, 0.5, (16, 16)))
    full = continue_ids(target, [3], 30)
    seen: list = []

    def until_ten(tokens):
        seen.extend(tokens)
        return len(seen) >= 10

    assert continue_ids(target, [3], 30, on_tokens=until_ten) == full[:10]
    seen.clear()
    res = speculative_greedy(target, draft, [3], 30, 3, on_tokens=until_ten)
    assert seen == res.tokens and full[:10] == res.tokens[:10] and 10 <= len(res.tokens) < 14  # ends with its round


def test_the_board_app_says_argument_and_output_errors_in_one_line_before_any_work(capsys):
    from edgekd.bench import lm_app

    with pytest.raises(SystemExit) as e:
        lm_app.main(["--bogus"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("generate.py: error:") and len(err.strip().splitlines()) == 1, err
    assert lm_app.main(["--prompt", "x", "--json", "/proc/x.json"]) == 2  # before the bundle is even read
    err = capsys.readouterr().err
    assert err.startswith("generate: --json /proc/x.json: /proc is not writable") and len(err.splitlines()) == 1
