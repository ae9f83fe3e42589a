"""What the preference objectives share (`dsft dpo`, `dsft orpo`, `dsft simpo`, and `dsft kto` for its
result): pairs tokenized once as TRL takes them (prompt_ids, chosen_ids, rejected_ids, the prompt fitted to
the section's max_prompt_length; dsft.data.preference), their trainer built from those rows, and a result
of the first and last logged rewards."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dsft.config.schema import Recipe
from dsft.train.objective import LOSS_PANELS, Objective, Prepared, StepsResult

REWARD_KEYS = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected")
PAIR_PANELS = {**LOSS_PANELS,
               "reward accuracy": (("train", "rewards/accuracies"), ("eval", "eval_rewards/accuracies")),
               "reward margin (chosen - rejected)": (("train", "rewards/margins"), ("eval", "eval_rewards/margins"))}


@dataclass
class PreferenceResult(StepsResult):
    """What a preference run prints: the first and last logged rewards, the rows it trained on, and the held-out
    pairs' scores after training (data.eval)."""

    held_out: dict[str, float] = field(default_factory=dict)


HELD_OUT = ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins")


def rewards(rows: list[dict[str, Any]]) -> dict[str, float]:
    return {k: r[k] for r in rows for k in REWARD_KEYS if k in r}


class PairObjective(Objective):
    """Preference pairs (`data.format: preference`): Prepared.train holds them as TRL's pair trainers take
    them (its `rows` are prompt + chosen, for routing profiles); the held-out pairs are Prepared.data["eval"]."""

    formats = ("preference",)
    panels = PAIR_PANELS
    kind = "dpo"  # the prepared-data kind (dsft.data.prepared) of its rows
    logged = "rewards/accuracies"  # a key every logged training row of the objective has
    columns = ("what", "first step", "last step")
    shown = {"rewards/accuracies": "reward acc", "rewards/margins": "margin"}

    def metric_lines(self, summary: dict[str, Any]) -> list[str]:
        """Reward accuracy and margin at the first and last logged steps."""
        from dsft.train.card import number

        first, last = summary.get("first") or {}, summary.get("last") or {}
        return [f"- {label}, first -> last logged step: {number(first.get(key))} -> {number(last[key])} (training pairs)"
                for key, label in (("rewards/accuracies", "reward accuracy"), ("rewards/margins", "reward margin"))
                if key in last]

    def table(self, result: Any) -> list[tuple[str, ...]]:
        """Rewards at the first and last logged steps, the held-out scores, its rows, its trainable parameters
        (result: a PreferenceResult)."""
        fmt = lambda d, key: f"{d[key]:.3f}" if key in d else "-"  # noqa: E731
        rows = [(key, fmt(result.first, key), fmt(result.last, key)) for key in REWARD_KEYS
                if key in result.first or key in result.last]
        held = getattr(result, "held_out", None) or {}
        if held:
            shown_keys = [(k, label) for k, label in (("eval_loss", "loss"), ("eval_rewards/accuracies", "reward accuracy"),
                                                       ("eval_rewards/margins", "reward margin")) if k in held]
            rows.append((f"held-out (data.eval): {', '.join(label for _, label in shown_keys)}", "",
                         ", ".join(f"{held[k]:.1%}" if "accuracies" in k else f"{held[k]:.3f}" for k, _ in shown_keys)))
        c = result.counts
        rows.append(("rows (prompts truncated / dropped)", f"{c['rows']:,}", f"{c['truncated']} / {c['dropped']}"))
        if "desirable" in c:
            rows.append(("desirable / undesirable rows", f"{c['desirable']:,} / {c['undesirable']:,}",
                         f"weights {c['desirable_weight']:.3g} / {c['undesirable_weight']:.3g}"))
        rows += [(f"trainable params: {group}", "", f"{n:,}") for group, n in result.groups.items()]
        return rows

    def tokenize(self, recipe: Recipe, tokenizer: Any, rows: None) -> dict[str, Any]:
        from dsft.data.prepared import Spec, prepare

        data, settings = recipe.data, self.settings(recipe)
        spec = lambda files, what, **per_file: Spec(self.kind, list(files), data.format, what, data.system_prompt,  # noqa: E731
                                                    fit=settings.fit(), section=self.name, **per_file)
        train = prepare(spec(data.train, "data.train", formats=data.file_formats(), columns=data.file_columns()),
                        tokenizer, data.num_proc)
        held_out = prepare(spec(data.eval, "data.eval"), tokenizer, data.num_proc) if data.eval else None
        counts = dict(train.meta["counts"])
        return {"train": train, "eval": None, "truncation": train.stats(data.max_length),
                "data": {"eval": held_out, "counts": counts}}

    def trainer_class(self) -> type:
        raise NotImplementedError

    def rows(self, tokens: Any, args: Any) -> Any:
        """The rows its trainer takes: those TRL would keep at max_length, the columns it reads."""
        from dsft.train.trainer import PREPARED_PAIRS

        return tokens.trainable(args.max_length).select_columns(sorted(PREPARED_PAIRS))

    def trainer(self, model: torch.nn.Module, args: Any, prepared: Prepared, callbacks: list[Any]) -> Any:
        held_out = prepared.data["eval"]
        return self.trainer_class()(model=model, args=args, train_dataset=self.rows(prepared.train, args),
                                    eval_dataset=self.rows(held_out, args) if held_out is not None else None,
                                    processing_class=prepared.tokenizer, callbacks=callbacks)

    def after_train(self, trainer: Any, prepared: Prepared, run: Path) -> dict[str, Any]:
        """The held-out pairs (data.eval) scored by the trained model once training ends, whatever
        training.eval_steps: TRL's evaluation (loss, reward accuracy and margin), logged to metrics.jsonl like
        any evaluation, for every pair objective alike."""
        if trainer.eval_dataset is None:
            return {}
        metrics = trainer.evaluate()
        return {"held_out": {k: float(v) for k, v in metrics.items() if k in HELD_OUT}}

    def finish(self, run: Path, prepared: Prepared, trainer: Any, metrics: Any, groups: dict[str, int],
               targets: dict[str, list[str]], plan: dict[str, Any] | None, extra: dict[str, Any]) -> tuple[Any, dict]:
        logged = [r for r in metrics.rows if self.logged in r]
        counts = prepared.data["counts"]
        result = PreferenceResult(run, {g: n for g, n in groups.items() if n}, len(prepared.train),
                                  rewards(logged[:1]), rewards(logged[-1:]), counts, extra.get("held_out") or {})
        return result, {"rows": counts, "first": result.first, "last": result.last,
                        **({"held_out": result.held_out} if result.held_out else {})}
