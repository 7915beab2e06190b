"""Specification of nextrap.rl.tasks: the addition split, the math checker, jsonl input, reward loading."""

import json

import pytest

from nextrap.rl.tasks import (
    TaskError,
    addition_splits,
    answers_match,
    exact_match,
    extract_answer,
    get_task,
    load_jsonl,
    load_reward,
    math_reward,
    parse_number,
)


def test_addition_splits_are_disjoint_complete_and_deterministic():
    train, heldout = addition_splits()
    assert len(train) == 9000 and len(heldout) == 1000
    assert not {e.prompt for e in train} & {e.prompt for e in heldout}
    assert len({e.prompt for e in train + heldout}) == 10000
    assert addition_splits() == (train, heldout)
    assert addition_splits(seed=1) != (train, heldout)


def test_addition_examples_are_correct_sums():
    train, heldout = addition_splits()
    for e in train[:50] + heldout[:50]:
        a, b = e.prompt.rstrip("=").split("+")
        assert e.prompt.endswith("=") and e.answer == str(int(a) + int(b))


def test_get_task():
    task = get_task("addition")
    assert task.reward("68", "68") == 1.0
    with pytest.raises(TaskError, match="unknown task"):
        get_task("sudoku")


def test_exact_match():
    assert exact_match(" 68 ", "68") == 1.0
    assert exact_match("680", "68") == 0.0
    assert exact_match("", "68") == 0.0


@pytest.mark.parametrize(
    "completion, answer",
    [
        ("so the answer is \\boxed{42}.", "42"),
        ("\\boxed{x = 5}", "5"),
        ("first 3, then \\boxed{\\frac{3}{4}}", "0.75"),
        ("\\boxed{\\dfrac{1}{2}}", "1/2"),
        ("The total is 1,234 dollars.", "1234"),
        ("It drops to -7 degrees", "-7"),
        ("about 2.50", "2.5"),
        ("3/4 of the cake", "0.75"),
        ("we get 0.333333", "1/3"),
        ("$1,000,000$", "1000000"),
        ("1 then 2 then 3", "3"),
        ("\\boxed{+12}", "12"),
    ],
)
def test_math_reward_accepts_equal_answers(completion, answer):
    assert math_reward(completion, answer) == 1.0


@pytest.mark.parametrize(
    "completion, answer",
    [
        ("\\boxed{41}", "42"),
        ("the answer is 42, no wait, 43", "42"),
        ("-7", "7"),
        ("3/5", "0.75"),
        ("no numbers here", "1"),
        ("\\boxed{12", "12x"),  # unbalanced box, last number 12 != "12x"
        ("", "0"),
    ],
)
def test_math_reward_rejects_wrong_answers(completion, answer):
    assert math_reward(completion, answer) == 0.0


def test_boxed_wins_over_later_numbers():
    assert extract_answer("\\boxed{7} (checked with 3 methods)") == "7"


def test_parse_number_and_text_fallback():
    assert parse_number("1,234.5") == parse_number("2469/2")
    assert parse_number("1/0") is None and parse_number("abc") is None
    assert answers_match("x + 1", "x  +  1") and not answers_match("x + 1", "x + 2")


def test_load_jsonl(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"prompt": "1+1=", "answer": "2"}\n\n{"prompt": "2+2=", "answer": 4}\n')
    rows = load_jsonl(f)
    assert [(r.prompt, r.answer) for r in rows] == [("1+1=", "2"), ("2+2=", "4")]


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"prompt": "a", "answer": "b"}\n{oops\n', ":2: not valid JSON"),
        ('{"prompt": "a"}\n', ':1: expected an object with "prompt" and "answer"'),
        ('[1, 2]\n', ":1: expected an object"),
        ('{"prompt": 3, "answer": "b"}\n', ':1: "prompt" must be a non-empty string'),
        ('{"prompt": "a", "answer": [1]}\n', ':1: "answer" must be a string or a number'),
        ("\n", "no rows"),
    ],
)
def test_load_jsonl_errors_name_file_and_line(tmp_path, text, message):
    f = tmp_path / "bad.jsonl"
    f.write_text(text)
    with pytest.raises(TaskError) as err:
        load_jsonl(f)
    assert str(err.value).startswith(str(f)) and message in str(err.value)
    assert "\n" not in str(err.value)


def test_load_jsonl_missing_file(tmp_path):
    with pytest.raises(TaskError, match="no such file"):
        load_jsonl(tmp_path / "nope.jsonl")


def test_load_reward():
    assert load_reward("nextrap.rl.tasks:math_reward") is math_reward
    for spec, message in [
        ("nextrap.rl.tasks", "expected module:function"),
        ("no_such_module_xyz:f", "cannot import"),
        ("nextrap.rl.tasks:nope", "has no function"),
        ("nextrap.rl.tasks:ADDITION_SEED", "has no function"),
    ]:
        with pytest.raises(TaskError, match=message):
            load_reward(spec)


def test_jsonl_rows_are_json_roundtrip(tmp_path):
    rows = [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(3)]
    f = tmp_path / "r.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [r.answer for r in load_jsonl(f)] == ["1", "2", "3"]
