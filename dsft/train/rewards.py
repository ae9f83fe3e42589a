"""GRPO's rewards (`grpo.rewards`): the built-in ones and the user's own functions, each wrapped so that a
reward that raises, exits, hangs, returns the wrong count, a non-number, NaN or infinity stops the run with one
line naming the reward and the row (a row's FILE:LINE travels with it as `dsft_row`), never a bad number
trained on.

Every reward is called as TRL calls one: `reward(prompts=..., completions=..., completion_ids=..., **columns)`,
the row's other fields by name (and TRL's `trainer_state`, `log_extra`, `log_metric`), returning one float
(or None: not applicable to that completion) per completion. The built-ins read the completion's text
(`answer_match` judges answers with math-verify, dsft.train.answers); a user's function runs in a process of
its own (dsft.train.sandbox: copies of the arguments, a time limit per call) and gets TRL's completions as
they are (conversational prompts give `[{"role": "assistant", "content": ...}]` per completion).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsft.config.objectives import RewardSpec
from dsft.data.prompts import PROMPT_TEXT, ROW
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

@dataclass
class Context:
    """What the built-ins know of the run beyond a completion: whether the chat template's generation prompt
    opens a reasoning block (R1-Distill's does: a completion without `</think>` was then cut off)."""

    reasoning_opened: bool = False


def answer_match(spec: RewardSpec, context: Context) -> Callable[..., list[float | None]]:
    """1 when the completion's final answer is the row's `answer` (dsft.train.answers), else 0; None for a row
    without an answer."""
    from dsft.train.answers import matches

    def reward(completions: list[Any], answer: list[Any] | None = None, **_: Any) -> list[float | None]:
        if answer is None:
            raise RewardError("the answer_match reward reads each row's `answer` column, and the rows have none; add "
                              "an `answer` field to the rows, or remove the reward")
        out: list[float | None] = []
        for completion, expected in zip(completions, answer):
            if expected is None or not str(expected).strip():
                out.append(None)
                continue
            out.append(float(matches(text_of(completion), expected, spec.marker, context.reasoning_opened)))
        return out

    return reward


THINK = re.compile(r"^\s*(?:<think>)?(?P<think>.*?)</think>(?P<answer>.*)$", re.DOTALL)


def think_format(spec: RewardSpec, context: Context) -> Callable[..., list[float]]:
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


def regex(spec: RewardSpec, context: Context) -> Callable[..., list[float]]:
    """1 when the pattern is found in the completion (`match: partial`) or matches all of it (`full`,
    surrounding whitespace ignored); else 0."""
    pattern = re.compile(spec.pattern or "", re.DOTALL if spec.match == "full" else 0)

    def reward(completions: list[Any], **_: Any) -> list[float]:
        test = (lambda t: pattern.fullmatch(t.strip())) if spec.match == "full" else pattern.search
        return [float(bool(test(text_of(c)))) for c in completions]

    return reward


def length(spec: RewardSpec, context: Context) -> Callable[..., list[float]]:
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


BUILTINS: dict[str, Callable[[RewardSpec, Context], Callable[..., list[Any]]]] = {
    "answer_match": answer_match, "think_format": think_format, "regex": regex, "length": length}


# ---------------------------------------------------------------- the user's own

def load_function(spec: RewardSpec, key: str, timeout: float) -> Callable[..., Any]:
    """`FILE.py:NAME` imported once, in its own process (dsft.train.sandbox); a file that does not exist or
    does not import, a name it lacks or that is not callable: one line naming `key`."""
    from dsft.train.sandbox import FunctionFailed, UserFunction

    file, _, name = (spec.function or "").rpartition(":")
    path = Path(file)
    if not path.is_file():
        raise DsftError(f"{key}: file not found: {path} (paths are relative to the current directory)")
    try:
        return UserFunction(path, name, timeout, spec.label)
    except FunctionFailed as e:
        raise DsftError(f"{key}: {e.reason}") from None


# ---------------------------------------------------------------- checked, as TRL calls them

class CheckedReward:
    """A reward as the trainer calls it (TRL names it by `__name__`): the row locations taken out of its
    keywords, its failures named with the reward at fault, its output checked."""

    def __init__(self, spec: RewardSpec, index: int, func: Callable[..., Any], builtin: bool, context: Context) -> None:
        self.spec, self.func, self.builtin, self.context = spec, func, builtin, context
        self.key = f"grpo.rewards[{index}] ({spec.label})"
        self.__name__ = spec.label

    def __call__(self, prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float | None]:
        from dsft.train.sandbox import FunctionFailed

        rows = kwargs.pop(ROW, None) or [None] * len(completions)
        texts = kwargs.pop(PROMPT_TEXT, None)
        if texts and all(isinstance(t, str) for t in texts):  # string prompts: strings, as TRL gives them
            prompts, completions = list(texts), [text_of(c) for c in completions]
        at = f"on the row at {rows[0] or 'an unknown row'} (or another of its batch)"
        try:
            out = self.func(prompts=prompts, completions=completions, **kwargs)
        except RewardError:
            raise
        except FunctionFailed as e:
            self.close()  # the run stops here: its process goes too, hung or not
            raise RewardError(f"{self.key}: {e.reason} {at}; fix the function (return None for a completion it "
                              "cannot score)") from None
        except Exception as e:  # noqa: BLE001 - a built-in's library may raise anything
            raise RewardError(f"{self.key}: raised {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''} "
                              f"{at}; fix it (return None for a completion it cannot score)") from None
        return self.check(out, rows)

    def close(self) -> None:
        """End a user's function's process (built-ins have none)."""
        if hasattr(self.func, "close"):
            self.func.close()

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


def build(specs: list[RewardSpec], timeout: float) -> list[CheckedReward]:
    """The recipe's rewards, the user's functions imported (once each, each in its own process, a call at most
    `timeout` seconds); the built-ins share one Context (set_reasoning_opened)."""
    out: list[CheckedReward] = []
    context = Context()
    try:
        for i, spec in enumerate(specs):
            key = f"grpo.rewards[{i}].function"
            func = BUILTINS[spec.builtin](spec, context) if spec.builtin else load_function(spec, key, timeout)
            out.append(CheckedReward(spec, i, func, spec.builtin is not None, context))
    except BaseException:
        close_all(out)
        raise
    return out


def close_all(rewards: list[CheckedReward]) -> None:
    for r in rewards:
        r.close()


def set_reasoning_opened(rewards: list[CheckedReward], tokenizer: Any) -> bool:
    """Tell the built-ins whether the chat template's generation prompt opens a reasoning block (`<think>` after
    the user's turn with no `</think>`: R1-Distill's templates), so that a completion never closing it counts as
    cut off. Returns it."""
    from dsft.train.answers import THINK_CLOSE, THINK_OPEN

    marker = "dsft-probe-7f3a"
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False,
                                             add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - a template that cannot render this is checked with the data
        return False
    after = str(text).rpartition(marker)[2]
    opened = THINK_OPEN in after and THINK_CLOSE not in after.rpartition(THINK_OPEN)[2]
    for r in rewards:
        r.context.reasoning_opened = opened
    return opened


def call_all(rewards: list[CheckedReward], prompts: list[Any], completions: list[Any], completion_ids: list[list[int]],
             columns: dict[str, list[Any]]) -> dict[str, list[float | None]]:
    """Every reward on one group, as the trainer will call them (before training: the first row's prompt with
    a completion the model generated, and with synthetic ones)."""
    return {r.__name__: r(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
            for r in rewards}


def scored(scores: dict[str, list[float | None]]) -> int:
    """Completions some reward scored (not None from every reward)."""
    columns = list(scores.values())
    return sum(any(c[i] is not None for c in columns) for i in range(len(columns[0]))) if columns else 0
