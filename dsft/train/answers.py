"""Is a completion's final answer the row's answer? The judgement behind the `answer_match` reward.

Where the answer is taken from (`final_answer`):
- only after a closed reasoning block: the text after the last `</think>`; a completion with a reasoning
  block still open (`<think>` without its `</think>`, or none at all when the chat template's generation
  prompt opened one, as R1-Distill's does) was cut off, and has no answer (TRL's
  `reasoning_accuracy_reward` rule: a policy never gains by leaving its reasoning unfinished);
- with a `marker` (e.g. `Answer:`): the first line after the last marker, else no answer;
- without one: every `\\boxed{...}` there (braces balanced), which must all agree (two different boxed
  answers are a hedge, never a match); no box, no answer.

How it is compared with the row's answer (`same_answer`), the answer's own form deciding:
- a number or formula (a digit or a LaTeX command, ASCII math characters only, and Hugging Face's
  math-verify parses it) is compared as math, the way TRL's `accuracy_reward` compares: both sides parsed
  to SymPy by math-verify and `verify`-ed (`0.5` = `.5` = `\\frac{1}{2}` = `1/2`, `1,250` = `1250`, `42` =
  `\\text{42}` = `42.0`, `$42.50` = `42.5`; `1000001` is not `1000000`, `.5` is not `5`). Before parsing,
  notation math-verify misreads is written out, never guessed at: a Unicode minus as `-`, thousands
  separators that group digits in threes (`1 000`, `1\\,000`, `12 345.5`) removed, `\\frac12` braced, a
  plain number in scientific notation or with a currency sign written as a decimal. `4 2` stays two numbers;
- anything else (a citation, a label, a word) as text: Unicode NFKC, case, runs of whitespace and one final
  period ignored, every other character kept (`17 U.S.C. § 106` = `17 u.s.c.  § 106.`, not `17 USC 106`).

A row without an answer (None or empty) is not scored (None), as TRL's rewards skip an unparseable
solution. tests/test_rewards.py holds a graded table of cases.
"""

from __future__ import annotations

import functools
import re
import threading
import unicodedata
from decimal import Decimal, InvalidOperation
from typing import Any

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
BOXED = "\\boxed{"

_MINUS = str.maketrans({"\u2212": "-", "\ufe63": "-"})
# thousands separators a number may be grouped with: space, no-break and thin spaces, LaTeX's thin spaces, {,}
_SEP = r"(?:\\,|\\;|\\!|\\ |~|\{,\}|[ \u00a0\u2009\u202f])"
_GROUPED = re.compile(rf"(?<![\d.,])\d{{1,3}}(?:{_SEP}\d{{3}})+(?![\d])")
_PLAIN = re.compile(r"^(?P<sign>[-+]?)\s*(?P<cur>\\?[$€£¥])?\s*(?P<num>(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|\.\d+)"
                    r"(?P<exp>[eE][-+]?\d+)?\s*(?P<pct>\\?%)?$")
_FRAC = re.compile(r"\\([dt]?frac)\s*(\d)\s*(\d)")
_WRAPS = ((r"$", r"$"), (r"\(", r"\)"), (r"\[", r"\]"))
_TEXT_CMD = re.compile(r"^\\(?:text|textbf|textrm|mathrm|mbox|mathbf)\{(.*)\}$", re.DOTALL)
_MATH_CHARS = re.compile(r"^[0-9A-Za-z\s.,+\-*/^_=()\[\]{}<>|!%$\\:;']*$")


# ---------------------------------------------------------------- where the answer is

def boxes(text: str) -> list[str]:
    """The contents of every \\boxed{...} in `text`, braces inside balanced (an unclosed box is left out)."""
    out, start = [], text.find(BOXED)
    while start >= 0:
        depth, i = 1, start + len(BOXED)
        for j in range(i, len(text)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                out.append(text[i:j])
                break
        start = text.find(BOXED, i)
    return out


def answer_part(text: str, reasoning_opened: bool = False) -> str | None:
    """The text after a closed reasoning block, or the whole text when there is none; None when a reasoning
    block is still open (cut off). `reasoning_opened`: the generation prompt opened one (R1-Distill)."""
    if THINK_CLOSE in text:
        after = text.rpartition(THINK_CLOSE)[2]
        return None if THINK_OPEN in after else after
    if THINK_OPEN in text or reasoning_opened:
        return None
    return text


def final_answer(text: str, marker: str | None, reasoning_opened: bool = False) -> list[str]:
    """The completion's final answer(s): the first line after the last `marker`, or without a marker every
    \\boxed{...}; [] when there is none (see the module docstring)."""
    part = answer_part(text, reasoning_opened)
    if part is None:
        return []
    if marker:
        if marker not in part:
            return []
        after = part.rpartition(marker)[2].strip()
        line = after.splitlines()[0].strip() if after else ""
        return [line] if line else []
    return [b for b in boxes(part)]


# ---------------------------------------------------------------- comparing

def _unwrap(s: str) -> str:
    s = s.strip()
    for left, right in _WRAPS:
        if len(s) > len(left) + len(right) and s.startswith(left) and s.endswith(right):
            return s[len(left):-len(right)].strip()
    return s


def _trim(s: str) -> str:
    """Whitespace and trailing sentence punctuation off the ends (`42.` `7,`), nothing inside."""
    return re.sub(r"[\s.,;:!]+$", "", s.strip()) if not re.fullmatch(r"[\s.,;:!]*", s) else ""


def as_text(s: str) -> str:
    """The text rule: NFKC, case folded, whitespace runs as one space, one final period off."""
    s = unicodedata.normalize("NFKC", str(s)).strip()
    m = _TEXT_CMD.match(s)
    s = _unwrap(m.group(1) if m else s)
    s = " ".join(s.split()).casefold()
    return s[:-1].rstrip() if s.endswith(".") else s


def _plain_number(s: str) -> str | None:
    """A plain number (sign, currency sign, thousands commas, decimals, exponent, percent) as a decimal
    string math-verify reads exactly; None for anything else."""
    m = _PLAIN.match(s)
    if not m:
        return None
    try:
        value = Decimal(m["num"].replace(",", "") + (m["exp"] or ""))
    except InvalidOperation:
        return None
    sign, percent = ("-" if m["sign"] == "-" else ""), ("\\%" if m["pct"] else "")
    return sign + format(value, "f") + percent


def as_math(s: str) -> str:
    """The answer as LaTeX math-verify reads as meant (see the module docstring)."""
    s = unicodedata.normalize("NFKC", str(s)).translate(_MINUS)
    s = _trim(_unwrap(_trim(s)))
    s = _GROUPED.sub(lambda m: re.sub(_SEP, "", m.group(0)), s)
    s = _FRAC.sub(r"\\\1{\2}{\3}", s)
    return _plain_number(s) or s


@functools.lru_cache(maxsize=1)
def _math_verify() -> tuple[Any, Any, list[Any]]:
    from latex2sympy2_extended import NormalizationConfig
    from math_verify import LatexExtractionConfig, parse, verify

    config = [LatexExtractionConfig(normalization_config=NormalizationConfig(units=True), boxed_match_priority=0,
                                    try_extract_without_anchor=False)]
    return parse, verify, config


def _timeouts() -> tuple[int | None, int | None]:
    """math-verify's timeouts use SIGALRM, which works in the main thread only (TRL turns them off elsewhere)."""
    main = threading.current_thread() is threading.main_thread()
    return (5, 5) if main else (None, None)


def _parsed(s: str) -> list[Any]:
    """math-verify's parse of one answer (as the content of a box, so the whole of it is the expression);
    [] when it is not math."""
    parse, _, config = _math_verify()
    parsing_timeout, _ = _timeouts()
    found = parse(BOXED + as_math(s) + "}", extraction_config=config, extraction_mode="first_match",
                  parsing_timeout=parsing_timeout)
    return found if found and not isinstance(found[0], str) else []


@functools.lru_cache(maxsize=4096)
def _gold(answer: str) -> tuple[Any, ...]:
    """The row's answer parsed as math, () when its form says text (see the module docstring)."""
    s = as_math(answer)
    if not s or not _MATH_CHARS.match(s) or not re.search(r"\d|\\[A-Za-z]+", s):
        return ()
    return tuple(_parsed(answer))


def is_math(answer: Any) -> bool:
    return bool(_gold(str(answer)))


def same_answer(got: str, expected: Any) -> bool:
    """`got` (one extracted answer) equals the row's answer: as text, or as math when the answer is math."""
    want = str(expected)
    if as_text(got) == as_text(want) and as_text(want):
        return True
    gold = _gold(want)
    if not gold:
        return False
    found = _parsed(got)
    if not found:
        return False
    _, verify, _ = _math_verify()
    return bool(verify(list(gold), found, timeout_seconds=_timeouts()[1]))


def matches(text: str, expected: Any, marker: str | None, reasoning_opened: bool = False) -> bool:
    """The completion's final answer is the row's answer (every boxed answer, when there are several)."""
    found = final_answer(text, marker, reasoning_opened)
    return bool(found) and all(same_answer(a, expected) for a in found)
