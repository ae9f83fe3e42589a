"""Direct Preference Optimization over TRL's DPOTrainer, with dsft's MoE adapters.

Without `dpo.init_adapter` a fresh adapter is placed as for SFT and the reference is the base model
(TRL's frozen "ref" copy of the fresh adapter, whose B matrices are zero). With it, the SFT adapter
(expert LoRA included) is loaded trainable and TRL's "ref" copy of it, frozen, is the reference: the
SFT model, held as a second adapter on the same base rather than a second model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dsft.adapters.selection import check_spec, read_config
from dsft.config.schema import DpoSection, Recipe
from dsft.data.preference import fit_prompts, load_pairs
from dsft.data.tokenize import tokenize_all
from dsft.errors import DsftError
from dsft.models.check import check_checkpoint
from dsft.models.load import load_model, load_tokenizer, model_identity, resolve_dtype, resolve_model_path
from dsft.train import run_dir
from dsft.train.dist import full_trainable_state, is_main
from dsft.train.sft import Prepared, check_disk_for, fp32_adapter, group_params, target_experts, trainer_args


@dataclass
class PreparedDpo:
    base: Prepared  # tokens of prompt + chosen, for routing profiles
    dpo: DpoSection
    train: list[dict[str, Any]]
    eval: list[dict[str, Any]] | None
    init_adapter: Path | None
    counts: dict[str, int] = field(default_factory=dict)


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


def _check_init_adapter(adapter: Path, config: dict[str, Any]) -> None:
    from dsft.adapters.metadata import check_adapter_dir, identity_mismatches, read_metadata

    check_adapter_dir(adapter, "dpo.init_adapter")
    wrong = identity_mismatches(config, read_metadata(adapter))
    if wrong:
        raise DsftError(f"dpo.init_adapter: {adapter} was trained on another model than model.path: {'; '.join(wrong)}")


def preflight(recipe: Recipe, force: bool, resume: bool = False) -> PreparedDpo:
    """Everything checked before the run directory exists: output dir, every pair, prompt lengths,
    the SFT adapter's base."""
    run_dir.check_output_dir(Path(recipe.output_dir), force, resume, run_dir.run_inputs(recipe))
    if recipe.data.format != "preference":
        raise DsftError("data.format: `dsft dpo` trains on preference rows (prompt, chosen, rejected); set preference")
    dpo = recipe.dpo or DpoSection()
    data = recipe.data
    pairs = load_pairs(data.train, data.system_prompt)
    eval_pairs = load_pairs(data.eval, data.system_prompt) if data.eval else None
    model_path = resolve_model_path(recipe.model.path)
    check_checkpoint(model_path)
    config = read_config(model_path)
    init = _adapter_dir(dpo.init_adapter) if dpo.init_adapter else None
    if init is not None:
        _check_init_adapter(init, config)
    selection = {} if init is not None else check_spec(recipe.adapter.routed_experts, config)
    if init is None:
        check_disk_for(recipe, config, selection)
    tokenizer = load_tokenizer(model_path, data.chat_template)
    fitted = fit_prompts(pairs, tokenizer, dpo.max_prompt_length, dpo.prompt_overflow)
    if not fitted.rows:
        raise DsftError(f"dpo.max_prompt_length {dpo.max_prompt_length}: every pair's prompt is longer; raise it")
    fitted_eval = fit_prompts(eval_pairs, tokenizer, dpo.max_prompt_length, dpo.prompt_overflow).rows if eval_pairs else None
    chosen = [r["prompt"] + r["chosen"] for r in fitted.rows]
    tokens = tokenize_all(tokenizer, chosen, None, data.assistant_only_loss)
    prepared = Prepared(recipe, model_path, config, selection, tokenizer, tokens, None)
    counts = {"pairs": len(pairs), "truncated": fitted.truncated, "dropped": fitted.dropped}
    return PreparedDpo(prepared, dpo, fitted.rows, fitted_eval, init, counts)


def dpo_config(recipe: Recipe, dpo: DpoSection, run: Path, dtype: torch.dtype) -> Any:
    from trl import DPOConfig

    return DPOConfig(**trainer_args(recipe, run, dtype), beta=dpo.beta, loss_type=[dpo.loss_type],
                     precompute_ref_log_probs=dpo.precompute_ref)


def _policy(prepared: PreparedDpo, run: Path, identity: dict[str, Any], info: dict[str, Any]):
    """The trainable policy: the SFT adapter continued, or a fresh adapter placed as for SFT."""
    from dsft.adapters.lora import attach_lora, load_lora
    from dsft.adapters.metadata import read_metadata

    recipe = prepared.base.recipe
    base = load_model(recipe.model, prepared.base.model_path)
    if prepared.init_adapter is not None:
        model = load_lora(base, str(prepared.init_adapter), is_trainable=True)
        meta = read_metadata(prepared.init_adapter)
        targets = {g: v["modules"] for g, v in meta.get("groups", {}).items()}
        if "routed_experts" in meta:
            targets["routed_experts"] = [f"model.layers.{layer}.mlp.experts" for layer in meta["routed_experts"]["experts"]]
        return model, targets, meta
    from rich.console import Console

    from dsft.adapters.plan import plan_table
    from dsft.train.targeting import check_plan, write_plan

    selection = target_experts(prepared.base, base, run, identity, info["data_sha256"])
    plan = write_plan(run, recipe, prepared.base.config, selection)
    if is_main():
        Console().print(plan_table(plan))
    model, targets = attach_lora(base, recipe.adapter, selection)
    check_plan(plan, group_params(model, targets))
    return model, targets, None


def _rewards(rows: list[dict[str, Any]]) -> dict[str, float]:
    keys = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected")
    return {k: r[k] for r in rows for k in keys if k in r}


def run_dpo(prepared: PreparedDpo, force: bool, checkpoint: Path | None = None) -> DpoResult:
    recipe = prepared.base.recipe
    run = Path(recipe.output_dir)
    identity = model_identity(prepared.base.model_path, recipe.model.path)
    args = dpo_config(recipe, prepared.dpo, run, resolve_dtype(recipe.model.dtype))
    with run_dir.lifecycle(run, recipe, "dpo", identity, force, checkpoint) as info:
        return _train(prepared, run, identity, info, args, checkpoint)


def _train(prepared: PreparedDpo, run: Path, identity: dict[str, Any], info: dict[str, Any], args: Any,
           checkpoint: Path | None = None) -> DpoResult:
    from datasets import Dataset

    from dsft.adapters.metadata import build_metadata, write_metadata
    from dsft.train import resume
    from dsft.train.callbacks import JsonlMetrics
    from dsft.train.resume import trim_metrics
    from dsft.train.trainer import DsftDPOTrainer

    recipe = prepared.base.recipe
    torch.manual_seed(recipe.training.seed)
    model, targets, init_meta = _policy(prepared, run, identity, info)
    metrics = JsonlMetrics(run / "metrics.jsonl")
    trainer = DsftDPOTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(prepared.train),
        eval_dataset=Dataset.from_list(prepared.eval) if prepared.eval else None,
        processing_class=prepared.base.tokenizer,
        callbacks=[metrics],
    )
    fp32_adapter(trainer.model)
    if checkpoint is not None:
        trim_metrics(run / "metrics.jsonl", int(checkpoint.name.split("-")[1]))
    resume.train(trainer, run, "dpo", checkpoint)
    state = full_trainable_state(trainer.model)
    if is_main():
        tmp = run / ".adapter.tmp"
        trainer.model.save_pretrained(tmp, selected_adapters=["default"], state_dict=state)
        prepared.base.tokenizer.save_pretrained(tmp)
        meta = init_meta or build_metadata(trainer.model, recipe.adapter, targets, identity)
        dpo_meta = {"init_adapter": str(prepared.init_adapter) if prepared.init_adapter else None,
                    "beta": prepared.dpo.beta, "loss_type": prepared.dpo.loss_type}
        write_metadata(tmp, {**meta, "dpo": dpo_meta})
        run_dir.publish(tmp, run / "adapter")
    logged = [r for r in metrics.rows if "rewards/accuracies" in r]
    groups = {g: n for g, n in group_params(trainer.model, targets).items() if n}
    result = DpoResult(run, groups, len(prepared.train), _rewards(logged[:1]), _rewards(logged[-1:]), prepared.counts)
    run_dir.complete(run, info, {"pairs": prepared.counts, "first": result.first, "last": result.last,
                                 "trainable_params": groups})
    return result
