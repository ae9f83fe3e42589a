"""GRPO's rewards: the built-ins judged against a table a careful human grader marked (wrong answers that
look right included), and a user's function held to its contract: it sees copies, it has a time limit, and
every way out of it (raise, sys.exit, os._exit, a hang, None for everything) is its named failure."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import REPO

GRADED = REPO / "tests/data/graded_answers.tsv"


def _graded() -> list[tuple[str, str, str | None, bool, float, str]]:
    cases = []
    for line in GRADED.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        text, answer, marker, opened, grade, why = line.split("\t")
        cases.append((text.replace("\\n", "\n"), answer, None if marker == "-" else marker, opened == "1", float(grade), why))
    return cases


def _builtin(name: str, reasoning_opened: bool = False, **options):
    from dsft.config.objectives import RewardSpec
    from dsft.train.rewards import BUILTINS, Context

    return BUILTINS[name](RewardSpec(builtin=name, **options), Context(reasoning_opened))


def test_the_graded_table_is_large_and_holds_the_known_holes() -> None:
    cases = _graded()
    assert len(cases) >= 60
    holes = {(r"\boxed{.5}", "5"), (r"\boxed{\$.50}", "50"), (r"\boxed{4 2}", "42"), (r"\boxed{1000001}", "1000000"),
             (r"<think>the total is \boxed{42}", "42")}
    assert holes <= {(t, a) for t, a, *_ in cases}
    assert {(r"\boxed{0.5}", ".5"), (r"\boxed{\text{42}}", "42"), ("\\boxed{\u221242}", "-42")} <= {(t, a) for t, a, *_ in cases}


@pytest.mark.parametrize("text, answer, marker, opened, grade, why", _graded(), ids=[c[5] for c in _graded()])
def test_answer_match_grades_as_a_careful_human(text: str, answer: str, marker: str | None, opened: bool, grade: float,
                                                why: str) -> None:
    reward = _builtin("answer_match", opened, marker=marker)
    completion = [{"role": "assistant", "content": text}]
    assert reward(completions=[completion, text], answer=[answer, answer]) == [grade, grade], why


def test_answer_match_skips_rows_without_an_answer_and_refuses_rows_without_the_column() -> None:
    from dsft.train.rewards import RewardError

    reward = _builtin("answer_match")
    assert reward(completions=[r"\boxed{1}", r"\boxed{1}", r"\boxed{1}"], answer=[None, "", "1"]) == [None, None, 1.0]
    assert reward(completions=[r"\boxed{7}"], answer=[7]) == [1.0]  # a JSON number as the answer
    with pytest.raises(RewardError, match="reads each row's `answer` column"):
        reward(completions=["x"])


@pytest.mark.parametrize("text, expected", [
    ("<think>\nsteps\n</think>\n\nThe answer is 4.", 1.0), ("steps\n</think>\nfour", 1.0),  # the prompt opened it
    ("<think>\n</think>\n\nfour", 0.0), ("<think>steps</think>   ", 0.0), ("no reasoning, four", 0.0),
    ("<think>a</think>b<think>c</think>d", 0.0), ("<think>steps, never closed", 0.0), ("", 0.0),
    ("<think>a</think>b</think>", 0.0), ("<think><think>a</think>b", 0.0), ("  <think>a</think>\nb", 1.0),
    ("<think>a</think><answer>4</answer>", 1.0),
])
def test_think_format(text: str, expected: float) -> None:
    assert _builtin("think_format")(completions=[text]) == [expected]


@pytest.mark.parametrize("pattern, match, text, expected", [
    (r"\d+ U\.S\.C\. § \d+", "partial", "See 17 U.S.C. § 106.", 1.0),
    (r"\d+ U\.S\.C\. § \d+", "full", " 17 U.S.C. § 106 ", 1.0),
    (r"\d+ U\.S\.C\. § \d+", "full", "See 17 U.S.C. § 106.", 0.0),
    (r"\d+ U\.S\.C\. § \d+", "partial", "section 106", 0.0),
    (r"\d+ U\.S\.C\. § \d+", "partial", "17 USC § 106", 0.0),
    (r"^Answer: \w+$", "partial", "Answer: yes", 1.0),
    (r"Answer: \w+", "full", "Reasoning.\nAnswer: yes", 0.0),
    (r"a.b", "full", "a\nb", 1.0),  # full matches span lines (DOTALL)
    (r"a.b", "partial", "a\nb", 0.0),
])
def test_regex(pattern: str, match: str, text: str, expected: float) -> None:
    assert _builtin("regex", pattern=pattern, match=match)(completions=[text]) == [expected]


@pytest.mark.parametrize("target, unit, text, ids, expected", [
    (4, "tokens", "x", [1, 2, 3, 4], 1.0), (4, "tokens", "x", [1, 2], 0.5), (4, "tokens", "x", [1] * 6, 0.5),
    (4, "tokens", "x", [1] * 12, -1.0), (4, "characters", "abcd", [1], 1.0), (4, "characters", "abcdefghijkl", [1], -1.0),
    (4, "characters", "", [1], 0.0), (16, "characters", "a" * 24, [1], 0.5),
])
def test_length(target: int, unit: str, text: str, ids: list[int], expected: float) -> None:
    assert _builtin("length", target=target, unit=unit)(completions=[text], completion_ids=[ids]) == [expected]


def test_a_template_that_opens_the_reasoning_makes_an_unclosed_completion_cut_off() -> None:
    """R1-Distill's chat template ends its generation prompt with `<think>\\n`: dsft reads that off the template,
    and then a completion that never writes `</think>` has no answer."""
    from dsft.config.objectives import RewardSpec
    from dsft.train.rewards import build, set_reasoning_opened

    class Template:
        def __init__(self, suffix: str) -> None:
            self.suffix = suffix

        def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
            return f"<|User|>{messages[0]['content']}<|Assistant|>{self.suffix}"

    rewards = build([RewardSpec(builtin="answer_match")], timeout=5)
    assert set_reasoning_opened(rewards, Template("<think>\n")) is True
    assert rewards[0](prompts=["q"], completions=[r"so \boxed{4}"], answer=["4"]) == [0.0]
    assert rewards[0](prompts=["q"], completions=[r"so 4</think> \boxed{4}"], answer=["4"]) == [1.0]
    assert set_reasoning_opened(rewards, Template("")) is False
    assert rewards[0](prompts=["q"], completions=[r"so \boxed{4}"], answer=["4"]) == [1.0]
    assert set_reasoning_opened(rewards, Template("<think>\n\n</think>\n\n")) is False  # opened and closed: no reasoning
    from dsft.models.load import load_tokenizer, resolve_model_path

    model = resolve_model_path("builtin:tiny-deepseek-v3")
    templates = REPO / "data_templates/chat_templates"
    assert set_reasoning_opened(rewards, load_tokenizer(model, str(templates / "r1-distill.jinja"))) is True
    assert set_reasoning_opened(rewards, load_tokenizer(model, str(templates / "r1-distill-2501.jinja"))) is False
    assert set_reasoning_opened(rewards, load_tokenizer(model)) is False


# ---------------------------------------------------------------- the user's function (its own process)

BAD = '''
import os, sys, time
SEEN = []

def ok(prompts, completions, answer, **kw):
    SEEN.append(1)
    completions.append("extra")            # mutates what it is given
    answer[0] = "changed"
    return [float(len(SEEN))] * (len(completions) - 1)

def reads(prompts, completions, answer, **kw):
    return [1.0 if a == "7" and c == "c" else 0.0 for a, c in zip(answer, completions)]

def leaves(prompts, completions, **kw):
    sys.exit(0)

def dies(prompts, completions, **kw):
    os._exit(3)

def hangs(prompts, completions, **kw):
    while True:
        pass

def sleeps(prompts, completions, **kw):
    time.sleep(60)

def nothing(prompts, completions, **kw):
    return [None] * len(completions)

def logs(prompts, completions, log_metric, trainer_state=None, **kw):
    log_metric("seen", 2.0)
    print("printed by the reward")
    return [0.5] * len(completions)
'''


@pytest.fixture
def user_file(tmp_path: Path) -> Path:
    path = tmp_path / "rewards.py"
    path.write_text(BAD)
    return path


def _user(path: Path, name: str, timeout: float = 10):
    from dsft.config.objectives import RewardSpec
    from dsft.train.rewards import build

    return build([RewardSpec(function=f"{path}:{name}")], timeout=timeout)[0]


def test_the_function_gets_copies_and_keeps_its_module_state(user_file: Path) -> None:
    from dsft.train.rewards import call_all

    ok, reads = _user(user_file, "ok"), _user(user_file, "reads")
    completions, columns = ["a", "c"], {"answer": ["1", "7"]}
    scores = call_all([ok, reads], ["q", "q"], completions, [[1], [2]], columns)
    assert scores == {"ok": [1.0, 1.0], "reads": [0.0, 1.0]}  # the next reward saw the rows unchanged
    assert completions == ["a", "c"] and columns == {"answer": ["1", "7"]}
    assert ok(prompts=["q"], completions=["a"], answer=["1"]) == [2.0]  # module state kept between calls
    ok.close()
    reads.close()


@pytest.mark.parametrize("name, reason", [
    ("leaves", "raised SystemExit: sys.exit(0) inside the function (line 15 of rewards.py) on the row at data.jsonl:3"),
    ("dies", "exited (code 3: sys.exit or os._exit inside the function or its imports) on the row at data.jsonl:3"),
    ("hangs", "did not return within 1 s for one batch (grpo.reward_timeout: make it faster or raise the limit)"),
    ("sleeps", "did not return within 1 s for one batch"),
])
def test_every_way_out_of_the_function_is_its_named_failure(user_file: Path, name: str, reason: str) -> None:
    import time

    from dsft.train.rewards import RewardError

    reward = _user(user_file, name, timeout=1)
    started = time.monotonic()
    with pytest.raises(RewardError) as e:
        reward(prompts=["q"], completions=["a"], dsft_row=["data.jsonl:3"])
    assert time.monotonic() - started < 5
    assert e.value.lines[0].startswith(f"grpo.rewards[0] ({name}): ") and reason in e.value.lines[0], e.value.lines[0]
    assert reward.func.process is None  # its process is gone, hung or not


def test_what_the_function_logs_and_prints_reaches_trl_and_run_log(user_file: Path, caplog) -> None:
    import logging
    import time

    got = []
    reward = _user(user_file, "logs")
    with caplog.at_level(logging.INFO, logger="dsft.rewards"):
        out = reward(prompts=["q"], completions=["a"], log_metric=lambda n, v: got.append((n, v)),
                     log_extra=lambda *a: None, trainer_state=None)
        time.sleep(0.3)  # the printed line travels through a pipe
    reward.close()
    assert out == [0.5] and got == [("seen", 2.0)]
    assert "logs: printed by the reward" in caplog.text


def test_a_function_that_scores_nothing_says_so(user_file: Path) -> None:
    from dsft.train.grpo import shown_scores
    from dsft.train.rewards import call_all, scored

    nothing = _user(user_file, "nothing")
    scores = call_all([nothing], ["q", "q"], ["a", "b"], [[1], [2]], {})
    nothing.close()
    assert scored(scores) == 0
    assert shown_scores(scores) == "nothing: none scored (None for all 2)"
    assert shown_scores({"a": [1.0, None], "b": [0.0, 1.0]}) == "a 1 (1 of 2 scored), b 0.5"


@pytest.mark.parametrize("source, expected", [
    ("import sys\nsys.exit(1)\n", "does not import (SystemExit: 1 (line 2 of r.py))"),
    ("raise RuntimeError('no table')\n", "does not import (RuntimeError: no table (line 1 of r.py))"),
    ("X = 1\n", "has no function 'f'"),
    ("f = 3\n", "is not a function (it is of type int)"),
])
def test_a_file_that_does_not_give_a_function_is_one_line(tmp_path: Path, source: str, expected: str) -> None:
    from dsft.config.objectives import RewardSpec
    from dsft.errors import DsftError
    from dsft.train.rewards import build

    (tmp_path / "r.py").write_text(source)
    with pytest.raises(DsftError) as e:
        build([RewardSpec(function=f"{tmp_path / 'r.py'}:f")], timeout=5)
    assert e.value.lines[0].startswith("grpo.rewards[0].function: ") and expected in e.value.lines[0], e.value.lines[0]


def test_a_run_whose_first_generation_scores_nothing_stops(cli, tmp_path: Path) -> None:
    from test_grpo import grpo_recipe

    rewards = tmp_path / "none.py"
    rewards.write_text("def nothing(prompts, completions, **kw):\n    return [None] * len(completions)\n")
    recipe = grpo_recipe(tmp_path, grpo={"max_completion_length": 4, "rewards": [{"function": f"{rewards}:nothing"}]},
                         training={"max_steps": 4, "micro_batch_size": 8, "save_steps": 2})
    result = cli("grpo", "--recipe", recipe)
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1, result.output
    assert "none scored" in result.output  # the check before the first step says so, no made-up 0
    assert "grpo.rewards: no completion of the first generation was scored" in errors[0]
    assert json.loads((tmp_path / "run/run.json").read_text())["status"] == "failed"


def test_string_prompts_give_the_reward_strings_and_a_flat_run_says_it_learns_nothing(cli, tmp_path: Path) -> None:
    """Rows whose prompt is a string: the reward gets prompts and completions as strings (TRL's contract),
    so `float(len(c))` works; a reward that scores every completion alike leaves no spread in any group, and
    after 3 logged steps the console says the run learns nothing (curves.png draws the share)."""
    from test_grpo import grpo_recipe

    rewards = tmp_path / "shape.py"
    rewards.write_text("def same(prompts, completions, **kw):\n"
                       "    assert all(isinstance(p, str) for p in prompts), type(prompts[0])\n"
                       "    assert all(isinstance(c, str) for c in completions), type(completions[0])\n"
                       "    return [float(len(c) >= 0) for c in completions]\n")
    recipe = grpo_recipe(tmp_path, grpo={"max_completion_length": 4, "rewards": [{"function": f"{rewards}:same"}]},
                         training={"max_steps": 3, "micro_batch_size": 8, "save_steps": 3, "logging_steps": 1})
    result = cli("grpo", "--recipe", recipe)
    assert result.exit_code == 0, result.output
    assert "warning: steps 1-3: every group's completions got the same reward" in result.output.replace("\n", " ")
    logged = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [r["frac_reward_zero_std"] for r in logged if "loss" in r] == [1.0, 1.0, 1.0]


def test_message_prompts_give_the_reward_message_completions() -> None:
    from dsft.config.objectives import RewardSpec
    from dsft.data.prompts import PROMPT_TEXT
    from dsft.train.rewards import CheckedReward, Context

    seen = {}

    def record(prompts, completions, **kw):
        seen.update(prompts=prompts, completions=completions)
        return [1.0] * len(completions)

    reward = CheckedReward(RewardSpec(function="x.py:record"), 0, record, False, Context())
    messages = [{"role": "user", "content": "Q?"}]
    completion = [{"role": "assistant", "content": "A."}]
    reward(prompts=[messages], completions=[completion], **{PROMPT_TEXT: [None]})
    assert seen == {"prompts": [messages], "completions": [completion]}
    reward(prompts=[messages], completions=[completion], **{PROMPT_TEXT: ["Q?"]})
    assert seen == {"prompts": ["Q?"], "completions": ["A."]}


def test_the_example_reward_file_scores_the_legal_prompts_as_documented() -> None:
    """data_templates/rewards/legal.py, as recipes/legal-grpo.yaml names it, in its own process."""
    from dsft.config.load import load_recipe
    from dsft.train.rewards import build, call_all

    recipe = load_recipe(REPO / "recipes/legal-grpo.yaml")
    spec = next(r for r in recipe.grpo.rewards if r.function)
    assert spec.function == "data_templates/rewards/legal.py:cites_statute"
    import os

    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        (reward,) = build([spec], timeout=10)
        row = json.loads((REPO / "data_templates/legal/prompts.jsonl").read_text().splitlines()[0])
        completions = [f"See {row['statute']}. Answer: {row['answer']}", "See 17 U.S.C. § 106.", "No idea."]
        scores = call_all([reward], [row["prompt"]] * 4, [*completions, "x"], [[1]] * 4,
                          {"statute": [row["statute"]] * 3 + [None], "answer": [row["answer"]] * 4,
                           "dsft_prompt": [row["prompt"]] * 4})
        reward.close()
    finally:
        os.chdir(cwd)
    assert scores == {"cites_statute": [1.0, 0.5, 0.0, None]}
