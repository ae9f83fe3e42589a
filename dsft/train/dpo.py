"""Direct Preference Optimization over TRL's DPOTrainer, with dsft's MoE adapters.

Without `dpo.init_adapter` a fresh adapter is placed as for SFT and the reference is the base model
(TRL's frozen "ref" copy of the fresh adapter, whose B matrices are zero). With it, the SFT adapter
(expert LoRA included) is loaded trainable and TRL's "ref" copy of it, frozen, is the reference: the
SFT model, held as a second adapter on the same base rather than a second model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dsft.config.schema import DpoSection, Recipe
from dsft.errors import DsftError
from dsft.train import pipeline
from dsft.train.pipeline import Prepared, trainer_args


@dataclass
class DpoResult:
    run: Path
    groups: dict[str, int]
    pairs: int
    first: dict[str, float]
    last: dict[str, float]
    counts: dict[str, int]


def _adapter_dir(path: str) -> Path:
    p = Path(path)
    return p / "adapter" if (p / "adapter" / "adapter_config.json").is_file() else p


def _rewards(rows: list[dict[str, Any]]) -> dict[str, float]:
    keys = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected")
    return {k: r[k] for r in rows for k in keys if k in r}


def dpo_config(recipe: Recipe, dpo: DpoSection, run: Path, dtype: torch.dtype) -> Any:
    from trl import DPOConfig

    return DPOConfig(**trainer_args(recipe, run, dtype), beta=dpo.beta, loss_type=[dpo.loss_type],
                     precompute_ref_log_probs=dpo.precompute_ref)


class DPO(pipeline.Objective):
    """Prepared.train holds the pairs as TRL's DPOTrainer takes them (prompt_ids, chosen_ids, rejected_ids,
    the prompt fitted to dpo.max_prompt_length), from the prepared-data cache; its `rows` are prompt + chosen
    (for routing profiles). The held-out pairs are Prepared.data["eval"]."""

    name = "dpo"

    def load_rows(self, recipe: Recipe) -> None:
        if recipe.data.format != "preference":
            raise DsftError("data.format: `dsft dpo` trains on preference rows (prompt, chosen, rejected); set preference")

    def init_adapter(self, recipe: Recipe, config: dict[str, Any]) -> Path | None:
        from dsft.adapters.metadata import read_metadata
        from dsft.adapters.weights import check_adapter_dir
        from dsft.models.identity import check_base
        from dsft.models.load import resolve_model_path
        from dsft.train.run_dir import refuse_checkpoint

        dpo = recipe.dpo or DpoSection()
        if not dpo.init_adapter:
            return None
        refuse_checkpoint(Path(dpo.init_adapter), "dpo.init_adapter")
        adapter = _adapter_dir(dpo.init_adapter)
        check_base(read_metadata(adapter).get("base_model"), resolve_model_path(recipe.model.path),
                   "dpo.init_adapter", force_hint=None)
        check_adapter_dir(adapter, "dpo.init_adapter", config)
        return adapter

    def tokenize(self, recipe: Recipe, tokenizer: Any, rows: None) -> dict[str, Any]:
        from dsft.data.prepared import Spec, prepare

        dpo, data = recipe.dpo or DpoSection(), recipe.data
        fit = {"max_prompt_length": dpo.max_prompt_length, "prompt_overflow": dpo.prompt_overflow}
        spec = lambda files, what: Spec("dpo", list(files), "preference", what, data.system_prompt, dpo=fit)  # noqa: E731
        train = prepare(spec(data.train, "data.train"), tokenizer, data.num_proc)
        held_out = prepare(spec(data.eval, "data.eval"), tokenizer, data.num_proc) if data.eval else None
        counts = {k: train.meta["counts"].get(k, 0) for k in ("pairs", "truncated", "dropped")}
        return {"train": train, "eval": None, "truncation": train.stats(data.max_length),
                "data": {"dpo": dpo, "eval": held_out, "counts": counts}}

    def trl_config(self, recipe: Recipe, prepared: Prepared, run: Path, dtype: torch.dtype) -> Any:
        return dpo_config(recipe, prepared.data["dpo"], run, dtype)

    def trainer(self, model: torch.nn.Module, args: Any, prepared: Prepared, callbacks: list[Any]) -> Any:
        from dsft.train.trainer import PREPARED_PAIRS, DsftDPOTrainer

        rows = lambda tokens: tokens.trainable(args.max_length).select_columns(sorted(PREPARED_PAIRS))  # noqa: E731
        held_out = prepared.data["eval"]
        return DsftDPOTrainer(model=model, args=args, train_dataset=rows(prepared.train),
                              eval_dataset=rows(held_out) if held_out is not None else None,
                              processing_class=prepared.tokenizer, callbacks=callbacks)

    def adapter_metadata(self, prepared: Prepared) -> dict[str, Any]:
        dpo = prepared.data["dpo"]
        return {"dpo": {"init_adapter": str(prepared.init_adapter) if prepared.init_adapter else None,
                        "beta": dpo.beta, "loss_type": dpo.loss_type}}

    def finish(self, run: Path, prepared: Prepared, trainer: Any, metrics: Any, groups: dict[str, int],
               targets: dict[str, list[str]], plan: dict[str, Any] | None, extra: dict[str, Any]) -> tuple[Any, dict]:
        logged = [r for r in metrics.rows if "rewards/accuracies" in r]
        counts = prepared.data["counts"]
        groups = {g: n for g, n in groups.items() if n}
        result = DpoResult(run, groups, len(prepared.train), _rewards(logged[:1]), _rewards(logged[-1:]), counts)
        return result, {"pairs": counts, "first": result.first, "last": result.last, "trainable_params": groups}


OBJECTIVE = pipeline.register(DPO())


def preflight(recipe: Recipe, force: bool, resume: bool = False) -> Prepared:
    """Everything checked before the run directory exists: output dir, every pair, prompt lengths,
    the SFT adapter's base."""
    return pipeline.preflight(recipe, OBJECTIVE, force, resume=resume)


def run_dpo(prepared: Prepared, force: bool, checkpoint: Path | None = None) -> DpoResult:
    return pipeline.run(prepared, OBJECTIVE, force, checkpoint)
