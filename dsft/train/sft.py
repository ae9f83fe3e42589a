"""Supervised fine-tuning: the SFT objective on the training spine (dsft.train.pipeline): conversations
-> tokens with the assistant-only loss mask (truncation counted) -> TRL's SFTTrainer; after training,
the held-out loss and the routing change."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dsft.config.schema import Recipe
from dsft.data.formats import CONVERSATION_FORMATS
from dsft.errors import DsftError
from dsft.outputs import is_main
from dsft.runs import run_dir
from dsft.train import pipeline
from dsft.train.objective import Objective, Prepared, register
from dsft.train.summary import model_params


@dataclass
class SftResult:
    run: Path
    groups: dict[str, int]
    trainable: int
    total: int
    train_tokens: int
    loss_tokens: int
    plan: dict[str, Any]
    losses: list[float] = field(default_factory=list)
    eval_loss: float | None = None
    truncation: dict[str, int] | None = None
    base_eval_loss: float | None = None
    routing_change: dict[str, float] | None = None  # per layer, on the profiled training sample
    routing_rows: int | None = None


def _count(tokens: Any, truncation: dict[str, int], max_length: int) -> tuple[int, int]:
    """Tokens and loss tokens the trainer sees, every row cut to `max_length` (packing cuts alike)."""
    import numpy as np

    return int(np.minimum(tokens.column("length"), max_length).sum()), truncation["loss_tokens"]


def routing_report(model: torch.nn.Module, prepared: Prepared, run: Path) -> tuple[dict[str, float], int] | None:
    """When the run has a routing profile, profile the same sample of training rows again with the adapter
    on and show how each layer's expert load moved (routing/after/, heatmap_diff.png, a table). Returns
    (load moved per layer, rows of the sample)."""
    from dsft.console import show
    from dsft.moe import profile as routing_profile
    from dsft.train.targeting import ROUTING_DIR, collect_shared

    directory = run / ROUTING_DIR
    before = routing_profile.read_profile(directory)
    if before is None:
        return None
    sample = prepared.train.sample(before["rows"], prepared.recipe.training.seed, prepared.recipe.data.max_length)
    stats = collect_shared(model, sample, before["count"], prepared.recipe.training.micro_batch_size,
                           prepared.tokenizer.pad_token_id)  # each process its share of the rows
    meta = {k: before[k] for k in ("key", "rows", "count")} | {"tokens_counted": next(iter(stats.values())).tokens}
    after = routing_profile.summarize(stats, before["top_k"], meta)
    if is_main():
        routing_profile.write_profile(directory / "after", after, "routing with the adapter")
        plan = run / run_dir.PLAN
        selected = json.loads(plan.read_text())["groups"].get("routed_experts", {}).get("experts") if plan.is_file() else None
        top = routing_profile.share_max(before, after)  # before and after on one colour scale
        routing_profile.heatmap(before, directory / "heatmap.png", "routing profile", selected=selected, vmax=top)
        routing_profile.heatmap(after, directory / "after" / "heatmap.png", "routing with the adapter",
                                selected=selected, vmax=top)
        routing_profile.heatmap(after, directory / "heatmap_diff.png", "routing change after training", diff_from=before,
                                selected=selected)
        show(routing_profile.diff_table(before, after, f"the profiled sample of {len(sample['input_ids']):,} training rows"))
    return routing_profile.load_moved(before, after), len(sample["input_ids"])


class SFT(Objective):
    name = "sft"
    formats = CONVERSATION_FORMATS
    mixes = True

    def table(self, result: SftResult) -> list[tuple[str, ...]]:
        rows = [(f"trainable params: {group}", f"{n:,}") for group, n in result.groups.items()]
        rows.append(("trainable / total params", f"{result.trainable:,} / {result.total:,}"))
        rows.append(("train tokens (on loss), after truncation", f"{result.train_tokens:,} ({result.loss_tokens:,})"))
        cut = result.truncation
        if cut and cut["truncated"]:
            rows.append(("rows cut to data.max_length (left without loss tokens)",
                         f"{cut['truncated']:,} of {cut['rows']:,} ({cut['no_loss_tokens']:,})"))
        if result.losses:
            rows.append(("loss first -> last", f"{result.losses[0]:.3f} -> {result.losses[-1]:.3f}"))
        if result.eval_loss is not None:
            base = f"base {result.base_eval_loss:.3f} -> " if result.base_eval_loss is not None else ""
            rows.append(("held-out loss (data.eval)", f"{base}{result.eval_loss:.3f}"))
        if result.routing_change:
            layer, moved = max(result.routing_change.items(), key=lambda kv: kv[1])
            rows.append((f"routing change on {result.routing_rows:,} profiled training rows", f"L{layer}: {moved:.1%} of its load moved"))
        return rows

    def load_rows(self, recipe: Recipe) -> None:
        if recipe.data.format == "preference":
            raise DsftError("data.format: preference rows are for `dsft dpo`, `dsft orpo`, `dsft simpo` or `dsft kto`; "
                            f"use {', '.join(CONVERSATION_FORMATS)} for sft")
        super().load_rows(recipe)

    def tokenize(self, recipe: Recipe, tokenizer: Any, rows: None) -> dict[str, Any]:
        """Every row checked and tokenized once into the prepared-data cache (dsft.data.prepared), or taken
        from it; truncation counted at data.max_length, packed or not."""
        from dsft.data.prepared import Spec, prepare, prepare_mix
        from dsft.data.tokenize import check_truncation

        data = recipe.data
        spec = lambda files, what, **per_file: Spec("sft", list(files), data.format, what, data.system_prompt,  # noqa: E731
                                                    data.assistant_only_loss, **per_file)
        train = prepare_mix(spec(data.train, "data.train", formats=data.file_formats(), columns=data.file_columns()),
                            data.shares(), recipe.training.seed, tokenizer, data.num_proc)
        cut = train.stats(data.max_length)
        check_truncation(cut, data.max_length)
        return {"train": train, "eval": prepare(spec(data.eval, "data.eval"), tokenizer, data.num_proc) if data.eval else None,
                "truncation": cut}

    def config_class(self) -> type:
        from trl import SFTConfig

        return SFTConfig

    def config_args(self, recipe: Recipe, prepared: Prepared) -> dict[str, Any]:
        # dsft hands SFTTrainer its prepared rows (input ids and loss mask, cut and kept as TRL would): TRL
        # neither tokenizes nor maps them again; dsft's collator turns the mask into labels (dsft.train.trainer).
        return {"packing": recipe.data.packing, "dataset_kwargs": {"skip_prepare_dataset": True},
                "remove_unused_columns": False}

    def trainer(self, model: torch.nn.Module, args: Any, prepared: Prepared, callbacks: list[Any]) -> Any:
        from dsft.train.trainer import DsftSFTTrainer, trainer_rows

        data = prepared.recipe.data
        return DsftSFTTrainer(model=model, args=args, train_dataset=trainer_rows(prepared.train, args, data.max_length),
                              eval_dataset=trainer_rows(prepared.eval, args, data.max_length) if prepared.eval else None,
                              processing_class=prepared.tokenizer, callbacks=callbacks, balance=prepared.recipe.training)

    def after_train(self, trainer: Any, prepared: Prepared, run: Path) -> dict[str, Any]:
        eval_loss = base_loss = None
        if prepared.eval:
            eval_loss = trainer.evaluate()["eval_loss"]
            with trainer.model.disable_adapter():  # the same held-out rows on the base model
                base_loss = trainer.evaluate(metric_key_prefix="base_eval")["base_eval_loss"]
        after = prepared.recipe.adapter.routed_experts.profile_after
        routing = routing_report(trainer.model, prepared, run) if after else None
        return {"eval_loss": eval_loss, "base_eval_loss": base_loss, "routing": routing}

    def finish(self, run: Path, prepared: Prepared, trainer: Any, metrics: Any, groups: dict[str, int],
               targets: dict[str, list[str]], plan: dict[str, Any] | None, extra: dict[str, Any]) -> tuple[Any, dict]:
        recipe = prepared.recipe
        total_tokens, loss_tokens = _count(prepared.train, prepared.truncation, recipe.data.max_length)
        losses = metrics.losses()
        change, sample = extra["routing"] or (None, None)
        result = SftResult(run, groups, sum(groups.values()), model_params(trainer.model), total_tokens, loss_tokens,
                           plan, losses, extra["eval_loss"], prepared.truncation, extra["base_eval_loss"], change, sample)
        summary = {"loss_tokens": loss_tokens,
                   "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
                   "eval_loss": extra["eval_loss"], "base_eval_loss": extra["base_eval_loss"],
                   "routing_change": change, "routing_sample_rows": sample, "truncation": prepared.truncation}
        return result, summary


OBJECTIVE = register(SFT())


def preflight(recipe: Recipe, force: bool, check_output: bool = True, resume: bool = False) -> Prepared:
    """Check the output dir, every data row and the expert selection, and tokenize; creates nothing."""
    return pipeline.preflight(recipe, OBJECTIVE, force, check_output, resume)


def run_sft(prepared: Prepared, force: bool, checkpoint: Path | None = None) -> SftResult:
    return pipeline.run(prepared, OBJECTIVE, force, checkpoint)
