"""GRPO (`dsft grpo`) over TRL's GRPOTrainer: the model being trained (NF4 experts, expert LoRA, attention
LoRA) generates `grpo.num_generations` completions per prompt in-process (KV cache on), the recipe's rewards
score them (dsft.train.rewards), and each completion's advantage is its reward against its group's.

dsft's defaults are TRL 1.16's: `loss_type: dapo`, `beta: 0` (no KL term, so no reference forward pass). With
`beta > 0` the reference is the adapter switched off (the base), or, continuing an SFT run
(`grpo.init_adapter`), that SFT adapter's frozen copy: never a second copy of the base. Dropout is off (the
policy ratio compares the same model's log-probs). Before training every reward is called on synthetic
completions of the first row (preflight: nothing created yet) and on one group the model generated for it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dsft.config.objectives import GrpoSection
from dsft.config.schema import Recipe
from dsft.runs import run_dir
from dsft.train.objective import Objective, Prepared, StepsResult, register

WINDOW = 5  # logged steps averaged for a run's first and last figures


@dataclass
class GrpoResult(StepsResult):
    """What a GRPO run prints: rewards and completion lengths over its first and last logged steps."""

    reference: str
    generation_share: float | None
    tokens_per_s: float | None


def mean_of(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return sum(values) / len(values) if values else None


def loss_settings(settings: GrpoSection) -> str:
    """The loss type's own settings as TRL gets them (the card and the summary show them)."""
    if settings.loss_type == "sapo":
        return "gate temperatures {:g} / {:g}".format(*settings.sapo_temperatures())
    if settings.loss_type == "cispo":
        return f"weights capped at {settings.clip_high():g}"
    return f"ratio clipped to [{1 - settings.clip_low():g}, {1 + settings.clip_high():g}]"


def reference(settings: GrpoSection, init_adapter: Path | None) -> str:
    if settings.beta == 0:
        return "none (beta 0: no KL term)"
    return "the SFT adapter's frozen copy" if init_adapter else "the adapter switched off (the base)"


def _fmt(value: Any, percent: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:.1%}" if percent else f"{value:.3f}"


class GRPO(Objective):
    name = "grpo"
    section = GrpoSection
    formats = ("prompt",)
    columns = ("what", f"first {5} logged steps", f"last {5} logged steps")
    shown = {"reward": "reward", "eval_reward": "held-out reward", "completions/mean_length": "tokens/completion",
             "completions/clipped_ratio": "cut", "kl": "KL", "generation/tokens_per_s": "gen tok/s"}

    def log_parts(self, logs: dict[str, Any]) -> list[str]:
        """Each reward function as `name mean±std` (metrics `rewards/NAME/mean` and `/std`)."""
        from dsft.train.callbacks import number

        out = []
        for key, value in logs.items():
            if key.startswith("rewards/") and key.endswith("/mean") and isinstance(value, (int, float)):
                std = logs.get(key[:-5] + "/std")
                out.append(f"{key[8:-5]} {number(float(value))}" + (f"±{float(std):.2g}" if isinstance(std, (int, float)) else ""))
        return out

    def table(self, result: GrpoResult) -> list[tuple[str, ...]]:
        first, last = result.first, result.last
        rows = [("reward (weighted sum)", _fmt(first.get("reward")), _fmt(last.get("reward")))]
        for key in first:
            if key.startswith("rewards/"):
                rows.append((f"  {key[8:-5]}", _fmt(first.get(key)), _fmt(last.get(key))))
        rows.append(("completion length (tokens)", _fmt(first.get("completions/mean_length")),
                     _fmt(last.get("completions/mean_length"))))
        rows.append(("cut at max_completion_length", _fmt(first.get("completions/clipped_ratio"), True),
                     _fmt(last.get("completions/clipped_ratio"), True)))
        c = result.counts
        rows.append(("prompts (truncated / dropped)", f"{c['rows']:,}", f"{c['truncated']} / {c['dropped']}"))
        rows.append(("time generating (generated tokens/s)", "", f"{_fmt(result.generation_share, True)} "
                     f"({result.tokens_per_s:,.0f})" if result.tokens_per_s else _fmt(result.generation_share, True)))
        rows.append(("reference", "", result.reference))
        rows += [(f"trainable params: {group}", "", f"{n:,}") for group, n in result.groups.items()]
        return rows

    def load_rows(self, recipe: Recipe) -> Any:
        """The rewards, the user's functions imported (a missing file or function is one line, before any
        model file is read)."""
        from dsft.train.rewards import build

        super().load_rows(recipe)
        settings = self.settings(recipe)
        return build(settings.rewards, settings.reward_timeout)

    def tokenize(self, recipe: Recipe, tokenizer: Any, rewards: Any) -> dict[str, Any]:
        from dsft.data.kinds import PROMPTS
        from dsft.data.prepared import Spec, prepare
        from dsft.train.rewards import set_reasoning_opened

        data, settings = recipe.data, self.settings(recipe)
        spec = lambda files, what, **per_file: Spec(PROMPTS, list(files), "prompt", what, data.system_prompt,  # noqa: E731
                                                    fit=settings.fit(), section=self.name, **per_file)
        set_reasoning_opened(rewards, tokenizer)
        train = prepare(spec(data.train, "data.train", columns=data.file_columns()), tokenizer, data.num_proc)
        held_out = prepare(spec(data.eval, "data.eval"), tokenizer, data.num_proc) if data.eval else None
        check_rewards(rewards, first_row(train, data.train), tokenizer)
        return {"train": train, "eval": None, "truncation": train.stats(data.max_length),
                "data": {"eval": held_out, "counts": dict(train.meta["counts"]), "rewards": rewards}}

    def config_class(self) -> type:
        from trl import GRPOConfig

        return GRPOConfig

    def config_args(self, recipe: Recipe, prepared: Prepared) -> dict[str, Any]:
        g = self.settings(recipe)
        pos, neg = g.sapo_temperatures()
        clip = {"epsilon": g.clip_low(), "epsilon_high": g.clip_high()} if g.loss_type != "sapo" else \
            {"sapo_temperature_pos": pos, "sapo_temperature_neg": neg}
        return {"num_generations": g.num_generations, "max_completion_length": g.max_completion_length,
                "temperature": g.temperature, "top_p": g.top_p, "top_k": 0, "beta": g.beta, "loss_type": g.loss_type,
                **clip, "use_bias_correction_kl": g.kl_corrected(),
                "steps_per_generation": g.steps_per_generation, "num_iterations": g.num_iterations,
                "reward_weights": [r.weight for r in g.rewards], "per_device_eval_batch_size": g.num_generations,
                "log_completions": False, "remove_unused_columns": False, "disable_dropout": True,
                "generation_kwargs": {"use_cache": True}, "shuffle_dataset": True}

    def trainer(self, model: torch.nn.Module, args: Any, prepared: Prepared, callbacks: list[Any]) -> Any:
        from dsft.train.trainer import DsftGRPOTrainer

        settings, data = self.settings(prepared.recipe), prepared.recipe.data
        held_out = prepared.data["eval"]
        run = Path(args.output_dir).parent  # args.output_dir is run_dir.checkpoints(run)
        trainer = DsftGRPOTrainer(model=model, reward_funcs=prepared.data["rewards"], args=args,
                                  train_dataset=rows_view(prepared.train, data.train, data.max_length),
                                  eval_dataset=rows_view(held_out, data.eval, data.max_length) if held_out else None,
                                  processing_class=prepared.tokenizer, callbacks=callbacks,
                                  fresh=prepared.init_adapter is None, completions=run_dir.completions(run),
                                  shown=settings.log_completions)
        return trainer

    def before_train(self, trainer: Any, prepared: Prepared) -> None:
        warm_up(trainer, prepared.data["rewards"])

    def after_train(self, trainer: Any, prepared: Prepared, run: Path) -> dict[str, Any]:
        """The rewards on the held-out prompts (data.eval), generated by the trained model."""
        if trainer.eval_dataset is None:
            return {}
        metrics = trainer.evaluate()
        return {"eval_reward": metrics.get("eval_reward")}

    def curve_panels(self, recipe: Recipe) -> dict[str, tuple[tuple[str, str], ...]]:
        settings = self.settings(recipe)
        rewards = settings.rewards
        if len(rewards) == 1 and rewards[0].weight == 1:  # the total is that one reward: one line, not two on top
            reward = (f"reward ({rewards[0].label})", ((rewards[0].label, "reward"), ("held-out", "eval_reward")))
        else:
            reward = ("reward (weighted sum, and each reward)", (("total", "reward"), ("held-out", "eval_reward"),
                                                                 *((r.label, f"rewards/{r.label}/mean") for r in rewards)))
        panels = {reward[0]: reward[1],
                  "groups with no reward spread (share; 1: nothing learned)": (("train", "frac_reward_zero_std"),),
                  "completion length (tokens)": (("mean", "completions/mean_length"), ("max", "completions/max_length")),
                  "cut at max_completion_length (share)": (("train", "completions/clipped_ratio"),),
                  "policy loss": (("train", "loss"),),
                  "seconds per logged step": (("generating", "time/generation_s"), ("training", "time/training_s"))}
        if settings.beta:
            panels["KL to the reference"] = (("train", "kl"),)
        return panels

    def card_lines(self, recipe: Recipe, summary: dict[str, Any]) -> list[str]:
        g = self.settings(recipe)
        rewards = ", ".join(f"{r.label} x{r.weight:g}" + (f" (`{r.function}`)" if r.function else "") for r in g.rewards)
        return [f"- grpo: rewards {rewards}; {g.num_generations} completions per prompt of at most "
                f"{g.max_completion_length} tokens, temperature {g.temperature:g}, top_p {g.top_p:g}; loss {g.loss_type} "
                f"({loss_settings(g)}), beta {g.beta:g} (reference: {summary.get('reference', reference(g, None))}"
                + (f"; KL {'bias-corrected' if g.kl_corrected() else 'k3, uncorrected'})" if g.beta else ")")
                + (f", continues `{g.init_adapter}`" if g.init_adapter else ""),
                f"- sampled completions with their rewards: `{run_dir.COMPLETIONS}`"]

    def finish(self, run: Path, prepared: Prepared, trainer: Any, metrics: Any, groups: dict[str, int],
               targets: dict[str, list[str]], plan: dict[str, Any] | None, extra: dict[str, Any]) -> tuple[Any, dict]:
        from dsft.train.rewards import close_all

        close_all(prepared.data["rewards"])  # the user's functions' processes
        settings = self.settings(prepared.recipe)
        logged = [r for r in metrics.rows if "reward" in r and "loss" in r]
        keys = ["reward", *(f"rewards/{r.label}/mean" for r in settings.rewards), "completions/mean_length",
                "completions/clipped_ratio"]
        window = lambda rows: {k: v for k in keys if (v := mean_of(rows, k)) is not None}  # noqa: E731
        generating = sum(r.get("time/generation_s", 0.0) for r in logged)
        training = sum(r.get("time/training_s", 0.0) for r in logged)
        share = generating / (generating + training) if generating + training else None
        result = GrpoResult(run, {g: n for g, n in groups.items() if n}, len(prepared.train), window(logged[:WINDOW]),
                            window(logged[-WINDOW:]), prepared.data["counts"], reference(settings, prepared.init_adapter),
                            share, mean_of(logged, "generation/tokens_per_s"))
        summary = {"rows": result.counts, "first": result.first, "last": result.last, "reference": result.reference,
                   "generation_share": share, "generated_tokens_per_s": result.tokens_per_s,
                   "settings": {"loss_type": settings.loss_type, "loss": loss_settings(settings), "beta": settings.beta,
                                "kl_bias_correction": settings.kl_corrected() if settings.beta else None,
                                "num_generations": settings.num_generations,
                                "max_completion_length": settings.max_completion_length,
                                "temperature": settings.temperature, "top_p": settings.top_p,
                                "generation": "in-process with the model being trained, KV cache on"},
                   **{k: v for k, v in extra.items() if v is not None}}
        return result, summary


# ---------------------------------------------------------------- rows and the checks before training

def rows_view(tokens: Any, files: list[str], max_length: int) -> Any:
    """The prepared prompt rows as the trainer reads them: `prompt` messages, the row's own fields, its place
    in `files` (the split's files)."""
    import functools

    from dsft.data.prompts import PROMPT_TEXT, ROW, as_rows

    view = tokens.trainable(max_length).select_columns(["prompt", "columns", ROW, PROMPT_TEXT])
    return view.with_transform(functools.partial(as_rows, files=list(files)))


def first_row(tokens: Any, files: list[str]) -> dict[str, Any]:
    from dsft.data.prompts import PROMPT_TEXT, ROW, as_rows

    batch = as_rows(tokens.dataset.select([0]).select_columns(["prompt", "columns", ROW, PROMPT_TEXT])[:], list(files))
    return {k: v[0] for k, v in batch.items()}


def _group(row: dict[str, Any], completions: list[Any], completion_ids: list[list[int]]) -> tuple:
    n = len(completions)
    columns = {k: [v] * n for k, v in row.items() if k != "prompt"}
    return [row["prompt"]] * n, completions, completion_ids, columns


def check_rewards(rewards: list[Any], row: dict[str, Any], tokenizer: Any) -> None:
    """Every reward on the first row with synthetic completions (an empty one, and one shaped as R1 answers
    with the row's `answer`): what fails here would fail in training. Nothing is created yet."""
    from dsft.train.rewards import RewardError, call_all

    answer = row.get("answer")
    texts = [f"<think>\nchecking\n</think>\n\n{answer if answer not in (None, '') else '42'}", ""]
    completions = [[{"role": "assistant", "content": t}] for t in texts]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    try:
        call_all(rewards, *_group(row, completions, ids))
    except RewardError as e:
        raise RewardError(f"{e.lines[0]} (dsft's check before training, on the completions {texts!r})") from None


def warm_up(trainer: Any, rewards: list[Any]) -> None:
    """One group generated for the first training prompt as training will generate it, and every reward called
    on it; the random state, token count and metrics are left as they were."""
    from dsft.console import say
    from dsft.outputs import is_main
    from dsft.train.rewards import call_all

    row = trainer.train_dataset[0]
    prompts = [row["prompt"]] * trainer.num_generations
    seen = trainer.state.num_input_tokens_seen
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    started = time.monotonic()
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        _, completion_ids, _, completions, *_ = trainer._generate(prompts)
    trainer.state.num_input_tokens_seen = seen
    for mode in trainer._metrics.values():
        mode.clear()
    scores = call_all(rewards, *_group(row, completions, completion_ids))
    trainer.timing = {"generation": 0.0, "tokens": 0, "since": time.monotonic()}
    if is_main():
        say(f"rewards checked on {len(prompts)} completions generated for the first prompt "
            f"({time.monotonic() - started:.1f} s): {shown_scores(scores)}")


def shown_scores(scores: dict[str, list[float | None]]) -> str:
    """Each reward's mean over the completions it scored, or that it scored none (never a made-up 0)."""
    parts = []
    for name, values in scores.items():
        mean = mean_of([{"v": v} for v in values if v is not None], "v")
        n = sum(v is not None for v in values)
        parts.append(f"{name} {mean:.3g}" + (f" ({n} of {len(values)} scored)" if n < len(values) else "")
                     if mean is not None else f"{name}: none scored (None for all {len(values)})")
    return ", ".join(parts)


OBJECTIVE = register(GRPO())
