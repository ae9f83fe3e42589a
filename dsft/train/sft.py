"""Supervised fine-tuning: recipe -> tokenized data -> (routing profile -> expert plan) -> LoRA model
-> TRL SFTTrainer -> run directory."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dsft.adapters.selection import check_spec, read_config
from dsft.config.schema import Recipe
from dsft.data.formats import load_conversations
from dsft.data.tokenize import IGNORE, check_truncation, tokenize_all, truncation
from dsft.errors import DsftError
from dsft.models.check import check_checkpoint
from dsft.models.load import load_model, load_tokenizer, model_identity, resolve_dtype, resolve_model_path, world_size
from dsft.train import run_dir
from dsft.train.dist import full_trainable_state, is_main


@dataclass
class Prepared:
    """Everything checked and built before the run directory exists."""

    recipe: Recipe
    model_path: Path
    config: dict[str, Any]
    selection: dict[int, list[int] | None] | None  # None: a policy decides after profiling
    tokenizer: Any
    train: dict[str, list[list[int]]]
    eval: dict[str, list[list[int]]] | None
    truncation: dict[str, int] | None = None  # what data.max_length cuts (None when packing)


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


def preflight(recipe: Recipe, force: bool, check_output: bool = True, resume: bool = False) -> Prepared:
    """Check the output dir, every data row and the expert selection, and tokenize; creates nothing."""
    if check_output:
        run_dir.check_output_dir(Path(recipe.output_dir), force, resume, run_dir.run_inputs(recipe))
    data = recipe.data
    if data.format == "preference":
        raise DsftError("data.format: preference rows are for `dsft dpo`; use messages, prompt_completion or alpaca for sft")
    train_rows = load_conversations(data.train, data.format, data.system_prompt)
    eval_rows = load_conversations(data.eval, data.format, data.system_prompt) if data.eval else None
    model_path = resolve_model_path(recipe.model.path)
    check_checkpoint(model_path)
    config = read_config(model_path)
    selection = check_spec(recipe.adapter.routed_experts, config)
    check_disk_for(recipe, config, selection)
    tokenizer = load_tokenizer(model_path, data.chat_template)
    tok = lambda rows: tokenize_all(tokenizer, rows, None, data.assistant_only_loss)  # noqa: E731
    train = tok(train_rows)
    cut = None
    if not data.packing:
        cut = truncation(train, data.max_length)
        check_truncation(cut, data.max_length)
    return Prepared(recipe, model_path, config, selection, tokenizer, train, tok(eval_rows) if eval_rows else None, cut)


def cpu_args() -> dict[str, Any]:
    """Without CUDA: the CPU, and for several processes DDP over gloo. Both flags are needed: without
    `use_cpu` the Trainer runs every rank unwrapped (no gradient all-reduce), each on its own shard."""
    if torch.cuda.is_available():
        return {}
    return {"use_cpu": True, "ddp_backend": "gloo"} if int(os.environ.get("WORLD_SIZE", "1")) > 1 else {"use_cpu": True}


def trainer_args(recipe: Recipe, run: Path, dtype: torch.dtype) -> dict[str, Any]:
    """recipe.training (+ data lengths) -> the TrainingArguments shared by TRL's SFT and DPO configs.
    dsft sets the precision flags itself: TRL would turn bf16 on by default, which makes CPU runs
    ~100x slower."""
    t = recipe.training
    return dict(
        output_dir=str(run / "checkpoints"),
        learning_rate=t.lr,
        lr_scheduler_type=t.scheduler,
        warmup_steps=t.warmup_ratio,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        per_device_train_batch_size=t.micro_batch_size,
        per_device_eval_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.grad_accum,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        seed=t.seed,
        data_seed=t.seed,
        gradient_checkpointing=t.activation_checkpointing,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=2,
        eval_strategy="steps" if t.eval_steps else "no",
        eval_steps=t.eval_steps,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        **cpu_args(),
        max_length=recipe.data.max_length,
        report_to=["tensorboard"] if importlib.util.find_spec("tensorboard") else "none",
        dataset_num_proc=None,
        dataloader_num_workers=0,
        disable_tqdm=False,
        average_tokens_across_devices=True,  # the loss of N processes equals one process's at the same global batch
        ddp_find_unused_parameters=False,
        # The balance loss is dsft's (training.balance_loss, dsft.moe.balance) for every family; TRL would
        # otherwise add Qwen-MoE's / Mixtral's router aux loss unasked.
        router_aux_loss_coef=0.0,
    )


def check_disk_for(recipe: Recipe, config: dict[str, Any], selection: dict[int, list[int] | None] | None) -> None:
    """Room for this recipe's checkpoints; a policy's selection is not known yet, so count every expert."""
    from dsft.adapters.plan import build_plan
    from dsft.adapters.selection import moe_layout

    if selection is None:
        selection = dict.fromkeys(moe_layout(config)[0])
    run_dir.check_disk(Path(recipe.output_dir), build_plan(recipe, config, selection)["trainable_params"])


def sft_config(recipe: Recipe, run: Path, dtype: torch.dtype) -> Any:
    from trl import SFTConfig

    return SFTConfig(**trainer_args(recipe, run, dtype), packing=recipe.data.packing)


def _count(tokens: dict[str, list[list[int]]], max_length: int | None) -> tuple[int, int]:
    """Tokens and loss tokens the trainer sees (after truncation to `max_length`, None when packing)."""
    cut = max_length or None
    total = sum(len(ids[:cut]) for ids in tokens["input_ids"])
    on_loss = sum(sum(1 for x in labels[1:cut] if x != IGNORE) for labels in tokens["labels"])
    return total, on_loss


def group_params(model: torch.nn.Module, targets: dict[str, list[str]]) -> dict[str, int]:
    """Trainable parameters per module group (routers trained whole count as `router`)."""
    owner = {name: group for group, names in targets.items() for name in names}
    counts = dict.fromkeys(targets, 0)
    for name, param in model.named_parameters():
        if param.requires_grad:
            module = name.removeprefix("base_model.model.").split(".lora_")[0]
            group = "router" if ".modules_to_save." in name else owner.get(module, "other")
            counts[group] = counts.get(group, 0) + param.numel()
    return counts


def model_params(model: torch.nn.Module) -> int:
    """Parameters of the model as trained, counting 4-bit weights by their shape (bitsandbytes packs
    two per byte; dsft's expert codes are not parameters when sharded)."""
    from dsft.moe.nf4 import PackedNF4

    total, seen = 0, set()
    for module in model.modules():
        if isinstance(module, PackedNF4):
            total += module.shape.numel()
            continue
        for p in module.parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            state = getattr(p, "quant_state", None)
            total += state.shape.numel() if state is not None else p.numel()
    return total


def expert_codes_layout(model: torch.nn.Module) -> str | None:
    """How the NF4 expert codes are held: `whole` on every rank, `sharded` by model.shard_experts; None
    without NF4 experts."""
    from dsft.moe.nf4 import PackedNF4

    stores = [m for m in model.modules() if isinstance(m, PackedNF4)]
    return None if not stores else "sharded" if all(m.sharded for m in stores) else "whole"


def fp32_adapter(model: torch.nn.Module) -> None:
    """Keep trainable weights in fp32: TRL casts them to bf16 on 4-bit models, and a trainable
    router is copied in the base dtype."""
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()


def target_experts(prepared: Prepared, model: torch.nn.Module, run: Path, identity: dict[str, Any],
                   data_sha: dict[str, str]) -> dict[int, list[int] | None]:
    """The static selection, or the policy applied to the (cached) routing profile."""
    if prepared.selection is not None:
        return prepared.selection
    from dsft.train.targeting import ROUTING_DIR, ensure_profile, policy_selection, profile_key

    spec = prepared.recipe.adapter.routed_experts
    key = profile_key(prepared.recipe, identity, data_sha, spec.samples, spec.count)
    profile, _ = ensure_profile(model, prepared.recipe, prepared.train, prepared.tokenizer.pad_token_id, key,
                                run / ROUTING_DIR, spec.samples, spec.count)
    return policy_selection(prepared.recipe, profile)


def routing_report(model: torch.nn.Module, prepared: Prepared, run: Path) -> None:
    """When the run has a routing profile, profile the same sample again with the adapter on and show
    how each layer's expert load moved (routing/after/, heatmap_diff.png, a table)."""
    from rich.console import Console

    from dsft.moe import profile as routing_profile
    from dsft.train.targeting import ROUTING_DIR, sample_rows

    directory = run / ROUTING_DIR
    before = routing_profile.read_profile(directory)
    if before is None:
        return
    sample = sample_rows(prepared.train, before["rows"], prepared.recipe.training.seed)
    stats = routing_profile.collect(model, sample, all_tokens=before["count"] == "all",
                                    batch_size=prepared.recipe.training.micro_batch_size,
                                    pad_id=prepared.tokenizer.pad_token_id)
    meta = {k: before[k] for k in ("key", "rows", "count")} | {"tokens_counted": next(iter(stats.values())).tokens}
    after = routing_profile.summarize(stats, before["top_k"], meta)
    if not is_main():
        return
    routing_profile.write_profile(directory / "after", after, "routing with the adapter")
    routing_profile.heatmap(after, directory / "heatmap_diff.png", "routing change after training", diff_from=before)
    Console().print(routing_profile.diff_table(before, after))


def resume_point(recipe: Recipe, resume: bool, resume_from: str | None, dry: bool = False) -> Path | None:
    """The checkpoint to resume from (checked against the run and its recipe), or None; `dry` only checks."""
    if not (resume or resume_from):
        return None
    from dsft.train.resume import prepare_resume

    return prepare_resume(Path(recipe.output_dir), run_dir.resolved_recipe(recipe), resume_from, dry)


def run_sft(prepared: Prepared, force: bool, checkpoint: Path | None = None) -> SftResult:
    recipe = prepared.recipe
    run = Path(recipe.output_dir)
    identity = model_identity(prepared.model_path, recipe.model.path)
    dtype = resolve_dtype(recipe.model.dtype)
    args = sft_config(recipe, run, dtype)
    with run_dir.lifecycle(run, recipe, "sft", identity, force, checkpoint) as info:
        return _train(prepared, run, identity, info, args, checkpoint)


def _train(prepared: Prepared, run: Path, identity: dict[str, Any], info: dict[str, Any], args: Any,
           checkpoint: Path | None = None) -> SftResult:
    from datasets import Dataset
    from rich.console import Console

    from dsft.adapters.lora import attach_lora
    from dsft.adapters.metadata import build_metadata, write_metadata
    from dsft.adapters.plan import plan_table
    from dsft.train import resume
    from dsft.train.callbacks import JsonlMetrics
    from dsft.train.resume import trim_metrics
    from dsft.train.targeting import check_plan, write_plan
    from dsft.train.trainer import DsftSFTTrainer

    recipe = prepared.recipe
    torch.manual_seed(recipe.training.seed)
    base = load_model(recipe.model, prepared.model_path)
    selection = target_experts(prepared, base, run, identity, info["data_sha256"])
    plan = write_plan(run, recipe, prepared.config, selection)
    if is_main():
        Console().print(plan_table(plan))
    model, targets = attach_lora(base, recipe.adapter, selection)
    check_plan(plan, group_params(model, targets))
    metrics = JsonlMetrics(run / "metrics.jsonl")
    trainer = DsftSFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_dict(prepared.train),
        eval_dataset=Dataset.from_dict(prepared.eval) if prepared.eval else None,
        processing_class=prepared.tokenizer,
        callbacks=[metrics],
        balance=recipe.training,
    )
    fp32_adapter(trainer.model)
    if checkpoint is not None:
        trim_metrics(run / "metrics.jsonl", int(checkpoint.name.split("-")[1]))
    resume.train(trainer, run, "sft", checkpoint)
    eval_loss = trainer.evaluate()["eval_loss"] if prepared.eval else None

    routing_report(trainer.model, prepared, run)

    state = full_trainable_state(trainer.model)
    if is_main():
        tmp = run / ".adapter.tmp"
        trainer.model.save_pretrained(tmp, state_dict=state)
        prepared.tokenizer.save_pretrained(tmp)
        write_metadata(tmp, build_metadata(trainer.model, recipe.adapter, targets, identity))
        run_dir.publish(tmp, run / "adapter")

    groups = group_params(trainer.model, targets)
    total_tokens, loss_tokens = _count(prepared.train, None if recipe.data.packing else recipe.data.max_length)
    trainable = sum(groups.values())
    result = SftResult(run, groups, trainable, model_params(trainer.model),
                       total_tokens, loss_tokens, plan, metrics.losses(), eval_loss, prepared.truncation)
    summary = {"trainable_params": groups, "train_tokens": total_tokens, "loss_tokens": loss_tokens,
               "first_loss": result.losses[0] if result.losses else None,
               "last_loss": result.losses[-1] if result.losses else None, "eval_loss": eval_loss,
               "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
               "truncation": prepared.truncation,
               "processes": world_size(), "expert_codes": expert_codes_layout(trainer.model),
               "targets": targets}
    run_dir.complete(run, info, summary)
    return result
