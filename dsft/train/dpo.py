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
    """Prepared.train holds prompt + chosen tokens (for routing profiles); the pairs as TRL takes them,
    fitted to dpo.max_prompt_length, are in Prepared.data."""

    name = "dpo"

    def load_rows(self, recipe: Recipe) -> tuple[list, list | None]:
        from dsft.data.preference import load_pairs

        data = recipe.data
        if data.format != "preference":
            raise DsftError("data.format: `dsft dpo` trains on preference rows (prompt, chosen, rejected); set preference")
        return load_pairs(data.train, data.system_prompt), load_pairs(data.eval, data.system_prompt) if data.eval else None

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

    def tokenize(self, recipe: Recipe, tokenizer: Any, rows: tuple[list, list | None]) -> dict[str, Any]:
        from dsft.data.preference import fit_prompts
        from dsft.data.tokenize import tokenize_all

        dpo = recipe.dpo or DpoSection()
        pairs, eval_pairs = rows
        fitted = fit_prompts(pairs, tokenizer, dpo.max_prompt_length, dpo.prompt_overflow)
        if not fitted.rows:
            raise DsftError(f"dpo.max_prompt_length {dpo.max_prompt_length}: every pair's prompt is longer; raise it")
        fitted_eval = fit_prompts(eval_pairs, tokenizer, dpo.max_prompt_length, dpo.prompt_overflow).rows if eval_pairs else None
        chosen = [r["prompt"] + r["chosen"] for r in fitted.rows]
        counts = {"pairs": len(pairs), "truncated": fitted.truncated, "dropped": fitted.dropped}
        return {"train": tokenize_all(tokenizer, chosen, None, recipe.data.assistant_only_loss,
                                               "tokenizing chosen answers"), "eval": None,
                "data": {"dpo": dpo, "pairs": fitted.rows, "eval_pairs": fitted_eval, "counts": counts}}

    def trl_config(self, recipe: Recipe, prepared: Prepared, run: Path, dtype: torch.dtype) -> Any:
        return dpo_config(recipe, prepared.data["dpo"], run, dtype)

    def trainer(self, model: torch.nn.Module, args: Any, prepared: Prepared, callbacks: list[Any]) -> Any:
        from datasets import Dataset

        from dsft.train.trainer import DsftDPOTrainer

        pairs, eval_pairs = prepared.data["pairs"], prepared.data["eval_pairs"]
        return DsftDPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(pairs),
                              eval_dataset=Dataset.from_list(eval_pairs) if eval_pairs else None,
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
        result = DpoResult(run, groups, len(prepared.data["pairs"]), _rewards(logged[:1]), _rewards(logged[-1:]), counts)
        return result, {"pairs": counts, "first": result.first, "last": result.last, "trainable_params": groups}


OBJECTIVE = pipeline.register(DPO())


def preflight(recipe: Recipe, force: bool, resume: bool = False) -> Prepared:
    """Everything checked before the run directory exists: output dir, every pair, prompt lengths,
    the SFT adapter's base."""
    return pipeline.preflight(recipe, OBJECTIVE, force, resume=resume)


def run_dpo(prepared: Prepared, force: bool, checkpoint: Path | None = None) -> DpoResult:
    return pipeline.run(prepared, OBJECTIVE, force, checkpoint)
