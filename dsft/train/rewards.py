"""GRPO's rewards (`grpo.rewards`): the built-in ones and the user's own functions, each wrapped so that a
reward that raises, returns the wrong count, a non-number, NaN or infinity stops the run with one line naming
the reward and the row (a row's FILE:LINE travels with it as `dsft_row`), never a bad number trained on.

Every reward is called as TRL calls one: `reward(prompts=..., completions=..., completion_ids=..., **columns)`,
the row's other fields by name, returning one float (or None: not applicable to that completion) per
completion. The built-ins read the completion's text; a user's function gets TRL's completions as they are
(conversational prompts give `[{"role": "assistant", "content": ...}]` per completion).
"""

from __future__ import annotations

import importlib.util
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dsft.config.schema import RewardSpec
from dsft.data.prompts import ROW
from dsft.errors import DsftError, shown


class RewardError(DsftError):
    """A reward function failed or returned what cannot be trained on."""


def text_of(completion: Any) -> str:
    """A completion's text: a string, or the content of its (last) assistant message."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content") or "")
    return str(completion)


# ---------------------------------------------------------------- the built-ins

BOXED = "\\boxed{"
NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+]?\.\d+")


def boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} (braces inside it balanced), or None."""
    start = text.rfind(BOXED)
    if start < 0:
        return None
    depth, i = 1, start + len(BOXED)
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def final_answer(text: str, marker: str | None) -> str | None:
    """The completion's final answer: the first line after the last `marker`, or with no marker the last
    \\boxed{...}; None when there is none. The reasoning before a `</think>` is never the answer."""
    text = text.rpartition("</think>")[2] if "</think>" in text else text
    if marker:
        if marker not in text:
            return None
        after = text.rpartition(marker)[2].strip()
        return after.splitlines()[0].strip() if after else None
    return boxed(text)


def _number(text: str) -> float | None:
    """The text as a number when it is one (`1,250`, `$42.50`, `12 %`, `3.0.`), else None."""
    core = text.strip().strip("$€£%. ").replace(" ", "")
    if not NUMBER.fullmatch(core):
        return None
    try:
        return float(core.replace(",", ""))
    except ValueError:
        return None


def same_answer(got: str, expected: Any) -> bool:
    """Numbers compared as numbers (1e-6 relative), anything else as text with case, spacing and a final
    period ignored."""
    want = str(expected)
    a, b = _number(got), _number(want)
    if a is not None and b is not None:
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)
    norm = lambda s: " ".join(s.strip().rstrip(".").split()).casefold()  # noqa: E731
    return norm(got) == norm(want)


def answer_match(spec: RewardSpec) -> Callable[..., list[float | None]]:
    """1 when the final answer equals the row's `answer`, else 0; None for a row without an answer."""

    def reward(completions: list[Any], answer: list[Any] | None = None, **_: Any) -> list[float | None]:
        if answer is None:
            raise RewardError("the answer_match reward reads each row's `answer` column, and the rows have none; add "
                              "an `answer` field to the rows, or remove the reward")
        out: list[float | None] = []
        for completion, expected in zip(completions, answer):
            got = final_answer(text_of(completion), spec.marker)
            out.append(None if expected in (None, "") else float(got is not None and same_answer(got, expected)))
        return out

    return reward


THINK = re.compile(r"^\s*(?:<think>)?(?P<think>.*?)</think>(?P<answer>.*)$", re.DOTALL)


def think_format(spec: RewardSpec) -> Callable[..., list[float]]:
    """1 for R1's shape: a non-empty reasoning closed by `</think>` (opened by `<think>`, or by the generation
    prompt as R1-Distill's newer templates do), then a non-empty answer with no second think block; else 0."""

    def reward(completions: list[Any], **_: Any) -> list[float]:
        out = []
        for completion in completions:
            m = THINK.match(text_of(completion))
            ok = bool(m and m["think"].strip() and m["answer"].strip() and "<think>" not in m["answer"]
                      and "</think>" not in m["answer"] and "<think>" not in m["think"])
            out.append(float(ok))
        return out

    return reward


def regex(spec: RewardSpec) -> Callable[..., list[float]]:
    """1 when the pattern is found in the completion (`match: partial`) or matches all of it (`full`,
    surrounding whitespace ignored); else 0."""
    pattern = re.compile(spec.pattern or "", re.DOTALL if spec.match == "full" else 0)

    def reward(completions: list[Any], **_: Any) -> list[float]:
        test = (lambda t: pattern.fullmatch(t.strip())) if spec.match == "full" else pattern.search
        return [float(bool(test(text_of(c)))) for c in completions]

    return reward


def length(spec: RewardSpec) -> Callable[..., list[float]]:
    """1 - |n - target| / target for a completion of n tokens (or characters): 1 at the target, falling
    linearly on both sides (below 0 beyond twice the target)."""
    target = float(spec.target or 1)

    def reward(completions: list[Any], completion_ids: list[list[int]] | None = None, **_: Any) -> list[float]:
        if spec.unit == "tokens" and completion_ids is not None:
            sizes = [len(ids) for ids in completion_ids]
        else:
            sizes = [len(text_of(c)) for c in completions]
        return [1.0 - abs(n - target) / target for n in sizes]

    return reward


BUILTINS: dict[str, Callable[[RewardSpec], Callable[..., list[Any]]]] = {
    "answer_match": answer_match, "think_format": think_format, "regex": regex, "length": length}


# ---------------------------------------------------------------- the user's own

def load_function(spec: RewardSpec, key: str) -> Callable[..., Any]:
    """`FILE.py:NAME` imported once (a file that does not exist or does not import, a name it lacks or that
    is not callable: one line naming `key`)."""
    file, _, name = (spec.function or "").rpartition(":")
    path = Path(file)
    if not path.is_file():
        raise DsftError(f"{key}: file not found: {path} (paths are relative to the current directory)")
    module_name = f"dsft_reward_{abs(hash(str(path.resolve()))):x}"
    try:
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        if module_spec is None or module_spec.loader is None:
            raise ImportError("not a Python file")
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - whatever the user's file raises on import
        raise DsftError(f"{key}: {path} does not import ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); "
                        "fix the file") from None
    func = getattr(module, name, None)
    if func is None:
        found = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                       and getattr(v, "__module__", None) == module_name)
        raise DsftError(f"{key}: {path} has no function {name!r}" + (f" (it has {', '.join(found)})" if found else ""))
    if not callable(func):
        raise DsftError(f"{key}: {path}:{name} is a {type(func).__name__}, not a function")
    return func


# ---------------------------------------------------------------- checked, as TRL calls them

class CheckedReward:
    """A reward as the trainer calls it (TRL names it by `__name__`): the row locations taken out of its
    keywords, its output checked."""

    def __init__(self, spec: RewardSpec, index: int, func: Callable[..., Any], builtin: bool) -> None:
        self.spec, self.func, self.builtin = spec, func, builtin
        self.key = f"grpo.rewards[{index}] ({spec.label})"
        self.__name__ = spec.label

    def __call__(self, prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float | None]:
        rows = kwargs.pop(ROW, None) or [None] * len(completions)
        try:
            out = self.func(prompts=prompts, completions=completions, **kwargs)
        except RewardError:
            raise
        except Exception as e:  # noqa: BLE001 - the user's function may raise anything
            raise RewardError(f"{self.key}: raised {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''} "
                              f"on the row at {rows[0] or 'an unknown row'} (or another of its batch); fix the function "
                              "(return None for a completion it cannot score)") from None
        return self.check(out, rows)

    def check(self, out: Any, rows: list[str | None]) -> list[float | None]:
        n = len(rows)
        if not isinstance(out, (list, tuple)) and not (hasattr(out, "tolist") and hasattr(out, "__len__")):
            raise RewardError(f"{self.key}: returned {type(out).__name__}; return a list of {n} floats (one per completion)")
        values = out.tolist() if hasattr(out, "tolist") else list(out)
        if len(values) != n:
            raise RewardError(f"{self.key}: returned {len(values)} rewards for {n} completions; return one per "
                              "completion (None where it does not apply)")
        for i, value in enumerate(values):
            if value is None:
                continue
            where = rows[i] or f"completion {i}"
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise RewardError(f"{self.key}: returned {shown(value)} ({type(value).__name__}) for the row at {where}; "
                                  "return a float, or None where the reward does not apply")
            if not math.isfinite(value):
                raise RewardError(f"{self.key}: returned {value} for the row at {where}; return a finite float, or "
                                  "None where the reward does not apply")
        return [None if v is None else float(v) for v in values]


def build(specs: list[RewardSpec]) -> list[CheckedReward]:
    """The recipe's rewards, the user's functions imported (once each)."""
    out = []
    for i, spec in enumerate(specs):
        key = f"grpo.rewards[{i}].function"
        func = BUILTINS[spec.builtin](spec) if spec.builtin else load_function(spec, key)
        out.append(CheckedReward(spec, i, func, spec.builtin is not None))
    return out


def call_all(rewards: list[CheckedReward], prompts: list[Any], completions: list[Any], completion_ids: list[list[int]],
             columns: dict[str, list[Any]]) -> dict[str, list[float | None]]:
    """Every reward on one group, as the trainer will call them (before training: the first row's prompt with
    a completion the model generated, and with synthetic ones)."""
    return {r.__name__: r(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
            for r in rewards}
