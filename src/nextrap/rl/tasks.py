"""Verifiable tasks and rewards for the bundled GRPO runner.

A task is a list of training prompts, a list of held-out prompts and a reward
`reward(completion, answer) -> float`. Two sources:

- the embedded task `addition`: 2-digit addition ("23+45=" -> "68"), small enough
  for the embedded CPU model in `fixtures/addition-lm` to partly solve;
- your own data: a JSON-lines file of `{"prompt": ..., "answer": ...}` rows
  (`load_jsonl`) and a reward given as `module:function` (`load_reward`);
  `math_reward` is the default, a numeric final-answer checker.

Everything here is a pure function of its inputs (the addition split is a fixed
permutation of all 10,000 pairs), so runs are reproducible.
"""

from __future__ import annotations

import importlib
import json
import random
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable

from nextrap.core.errors import NextrapError

Reward = Callable[[str, str], float]

ADDITION_SEED = 1234
ADDITION_TRAIN = 9000  # the other 1,000 of the 10,000 pairs are held out


class TaskError(NextrapError, ValueError):
    """Bad task input (unknown task, malformed jsonl, unloadable reward); one-line message."""


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str


@dataclass(frozen=True)
class Task:
    name: str
    train: list[Example]
    heldout: list[Example]
    reward: Reward


# ---------------------------------------------------------------------------
# The embedded task: 2-digit addition


def addition_splits(seed: int = ADDITION_SEED) -> tuple[list[Example], list[Example]]:
    """All 10,000 pairs a+b with 0 <= a, b <= 99, shuffled with a fixed seed: 9,000 train, 1,000 held out.

    Operands are written without zero padding ("3+45="); the answer is the plain sum ("48").
    """
    pairs = [(a, b) for a in range(100) for b in range(100)]
    random.Random(seed).shuffle(pairs)
    examples = [Example(f"{a}+{b}=", str(a + b)) for a, b in pairs]
    return examples[:ADDITION_TRAIN], examples[ADDITION_TRAIN:]


def exact_match(completion: str, answer: str) -> float:
    """1.0 when the completion, stripped of surrounding whitespace, is exactly the answer."""
    return float(completion.strip() == answer.strip())


def get_task(name: str) -> Task:
    """A built-in task by name (today: `addition`)."""
    if name == "addition":
        train, heldout = addition_splits()
        return Task("addition", train, heldout, exact_match)
    raise TaskError(f"unknown task {name!r}; built-in tasks: addition (or pass a jsonl file with --data)")


# ---------------------------------------------------------------------------
# Math answer checking

# A number as people write it in answers: optional sign, digits with optional thousands
# commas, optional decimals, optional "/denominator".
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*-?\d+(?:\.\d+)?)?|-?\.\d+")
_FRAC = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")


def _boxed_contents(text: str) -> str | None:
    """The contents of the last \\boxed{...} (braces matched), or None."""
    start = text.rfind("\\boxed")
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return None  # unbalanced: the model stopped mid-answer


def parse_number(text: str) -> Fraction | None:
    """An exact value for '1,234', '-3.5', '3/4', '\\frac{3}{4}', '$12$'; None when it is not a number."""
    s = _FRAC.sub(r"(\1)/(\2)", text)
    s = s.replace("$", "").replace("\\!", "").replace("\\,", "").replace("(", "").replace(")", "")
    s = s.replace(",", "").replace(" ", "").strip().rstrip(".")
    if s.startswith("+"):
        s = s[1:]
    try:
        if "/" in s:
            num, den = s.split("/", 1)
            return Fraction(num) / Fraction(den)
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def extract_answer(completion: str) -> str | None:
    """The final answer in a completion: the last \\boxed{...} if present, else the last number."""
    boxed = _boxed_contents(completion)
    if boxed is not None:
        if parse_number(boxed) is not None:
            return boxed.strip()
        completion = _FRAC.sub(r"\1/\2", boxed)  # e.g. "x = 5": fall back to its last number
    numbers = _NUMBER.findall(completion)
    return numbers[-1].strip() if numbers else None


def answers_match(predicted: str, reference: str, rel_tol: float = 1e-6) -> bool:
    """Numeric comparison when both parse as numbers (0.75 == 3/4 == '3/4'), else whitespace-normalized text."""
    p, r = parse_number(predicted), parse_number(reference)
    if p is not None and r is not None:
        # exact for integers and fractions; the tolerance only forgives rounded decimals like 0.333333
        return p == r or abs(float(p - r)) <= rel_tol * max(1.0, abs(float(r)))
    return " ".join(predicted.split()) == " ".join(reference.split())


def math_reward(completion: str, answer: str) -> float:
    """1.0 when the completion's final answer (boxed, else last number) equals the reference answer."""
    predicted = extract_answer(completion)
    return float(predicted is not None and answers_match(predicted, answer))


# ---------------------------------------------------------------------------
# User data and rewards


def load_jsonl(path: str | Path) -> list[Example]:
    """Rows of {"prompt": str, "answer": str-or-number}; a bad row raises TaskError naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise TaskError(f"{path}: no such file")
    examples = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict) or "prompt" not in row or "answer" not in row:
                raise TaskError(f'{path}:{lineno}: expected an object with "prompt" and "answer"')
            prompt, answer = row["prompt"], row["answer"]
            if not isinstance(prompt, str) or not prompt:
                raise TaskError(f'{path}:{lineno}: "prompt" must be a non-empty string')
            if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
                raise TaskError(f'{path}:{lineno}: "answer" must be a string or a number')
            examples.append(Example(prompt, str(answer)))
    if not examples:
        raise TaskError(f"{path}: no rows")
    return examples


def load_reward(spec: str) -> Reward:
    """Import `module:function`, a callable reward(completion: str, answer: str) -> float."""
    module_name, sep, func_name = spec.partition(":")
    if not sep or not module_name or not func_name:
        raise TaskError(f"reward {spec!r}: expected module:function, e.g. nextrap.rl.tasks:math_reward")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise TaskError(f"reward {spec!r}: cannot import {module_name!r} ({e})") from None
    func = getattr(module, func_name, None)
    if not callable(func):
        raise TaskError(f"reward {spec!r}: {module_name} has no function {func_name!r}")
    return func
