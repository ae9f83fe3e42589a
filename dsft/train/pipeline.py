"""The one training spine every objective runs on.

    preflight: output dir (ownership, lock holder) -> the objective's rows -> model files checked ->
               base config -> SFT adapter to continue (if any) -> expert selection -> disk -> tokenizer ->
               the objective's tokens.                        Creates nothing; every error is one line.
    run:       run directory (lifecycle: recipe.yaml, run.json, status) -> run.log, trackers -> seed ->
               load the base -> choose experts (routing profile for a policy) -> plan -> attach adapters
               (or continue one) -> the objective's trainer -> fp32 masters -> train (checkpoints, resume,
               signals; dsft's progress display) -> the objective's evaluation -> save, publish the
               adapter -> summary -> curves.png, README.md -> complete.

An objective (SFT, DPO, KTO, ORPO, SimPO, GRPO, or a plug-in: dsft.train.objective) supplies only what differs:
its data checks and tokenization, its TRL config and trainer, what it adds to the adapter's metadata and its
summary. The settings every objective shares are dsft.train.settings; the summary every run has,
dsft.train.summary.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch

from dsft.config.schema import Recipe
from dsft.console import Phase, run_log, show
from dsft.errors import DsftError
from dsft.runs import lifecycle, run_dir
from dsft.outputs import is_main
from dsft.train.dist import full_trainable_state
from dsft.train.layout import apply_layout, check_layout, processes
from dsft.train.objective import Objective, Prepared
from dsft.train.settings import check_optimizer, check_trackers, quiet_trainer, trackers, trl_config
from dsft.train.summary import group_params, spine_summary

# ---------------------------------------------------------------- pieces the spine (and objectives) use

def check_disk_for(recipe: Recipe, config: dict[str, Any], selection: dict[int, list[int] | None] | None) -> None:
    """Room for this recipe's checkpoints; a policy's selection is not known yet, so count every expert."""
    from dsft.adapters.plan import build_plan
    from dsft.adapters.selection import moe_layout

    if selection is None:
        selection = dict.fromkeys(moe_layout(config)[0])
    lifecycle.check_disk(Path(recipe.output_dir), build_plan(recipe, config, selection)["trainable_params"],
                       recipe.training.checkpoints_kept)


def fp32_adapter(model: torch.nn.Module) -> None:
    """Keep trainable weights in fp32: TRL casts them to bf16 on 4-bit models, and a trainable
    router is copied in the base dtype."""
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()


def target_experts(prepared: Prepared, model: torch.nn.Module, run: Path, identity: dict[str, Any],
                   data_sha: dict[str, str], runner: Any = None) -> tuple[dict[int, list[int] | None], dict[str, Any] | None]:
    """The static selection, or the policy applied to the (cached) routing profile; and what the plan says of
    the profile (None without one). `runner`: what runs a new profile's forwards (targeting.ensure_profile)."""
    if prepared.selection is not None:
        return prepared.selection, None
    from dsft.train.targeting import ROUTING_DIR, ensure_profile, policy_selection, profile_key, profile_summary

    spec = prepared.recipe.adapter.routed_experts
    key = profile_key(prepared.recipe, identity, data_sha, spec.samples, spec.count)
    profile, computed = ensure_profile(model, prepared.recipe, prepared.train, prepared.tokenizer.pad_token_id, key,
                                       run / ROUTING_DIR, spec.samples, spec.count, runner=runner)
    return policy_selection(prepared.recipe, profile, run / ROUTING_DIR), profile_summary(profile, computed)


def resume_point(recipe: Recipe, resume: bool, resume_from: str | None, dry: bool = False) -> Path | None:
    """The checkpoint to resume from (checked against the run and its recipe), or None; `dry` only checks."""
    if not (resume or resume_from):
        return None
    from dsft.train.resume import prepare_resume

    return prepare_resume(Path(recipe.output_dir), lifecycle.resolved_recipe(recipe), resume_from, dry)


# ---------------------------------------------------------------- the spine

def preflight(recipe: Recipe, goal: Objective, force: bool, check_output: bool = True, resume: bool = False,
              world: int | None = -1) -> Prepared:
    """Check the output dir, every data row, the model files, the expert selection and the layout (on `world`
    processes: this command's by default, None not to check them), and tokenize; creates nothing."""
    from dsft.adapters.selection import check_groups, check_spec, read_config
    from dsft.models.check import check_checkpoint
    from dsft.models.load import load_tokenizer, resolve_model_path

    from dsft.config.schema import foreign_section

    problem = foreign_section(recipe, goal.name)
    if problem:
        raise DsftError(problem)
    if check_output:
        lifecycle.check_output_dir(Path(recipe.output_dir), force, resume, lifecycle.run_inputs(recipe))
    check_trackers(recipe)
    check_optimizer(recipe)
    rows = goal.load_rows(recipe)
    model_path = resolve_model_path(recipe.model.path, recipe.model.revision)
    check_checkpoint(model_path)
    config = read_config(model_path)
    init = goal.init_adapter(recipe, config)
    check_layout(recipe, goal, config, processes() if world == -1 else world, init)
    if init is None:
        check_groups(recipe.adapter, config)
    selection = {} if init is not None else check_spec(recipe.adapter.routed_experts, config)
    if init is None:
        check_disk_for(recipe, config, selection)
    tokenizer = load_tokenizer(model_path, recipe.data.chat_template)
    return Prepared(recipe, model_path, config, selection, tokenizer, init_adapter=init,
                    **goal.tokenize(recipe, tokenizer, rows))


def _policy(prepared: Prepared, run: Path, identity: dict[str, Any], info: dict[str, Any]):
    """The trainable model: an adapter continued (with its recorded targets), or a fresh one placed by
    the plan. Returns (model, targets by group, the continued adapter's metadata or None, the plan)."""
    from dsft.adapters.lora import attach_lora, load_lora
    from dsft.adapters.metadata import read_metadata, recorded_targets
    from dsft.adapters.plan import plan_table
    from dsft.models.load import load_model
    from dsft.moe.parallel import dispatched
    from dsft.train.targeting import check_plan, data_summary, write_plan

    recipe = prepared.recipe
    # under training.parallel each rank reads 1/ep of the experts (a continued adapter: only its experts' rows of the
    # expert LoRA too; a policy's routing profile runs with the tokens dispatched to them), and the rest as placeholders
    # that dsft.train.layout reads as the rank's FSDP2 shards (a routing profile runs on a companion holding its shards)
    parallel = recipe.training.parallel
    split = parallel.ep if parallel is not None else 1
    base = load_model(recipe.model, prepared.model_path, expert_parallel=split, rest_later=parallel is not None)
    if prepared.init_adapter is not None:
        model = load_lora(base, str(prepared.init_adapter), is_trainable=True)
        meta = read_metadata(prepared.init_adapter)
        return model, recorded_targets(meta), meta, None
    with dispatched(base, split) if split > 1 else contextlib.nullcontext():
        selection, profile = target_experts(prepared, base, run, identity, info["data_sha256"],
                                            runner=(lambda: sharded_companion(recipe.model, prepared.model_path, base))
                                            if parallel else None)
    plan = write_plan(run, recipe, prepared.config, selection, data_summary(prepared.train, prepared.eval), profile)
    if is_main():
        show(plan_table(plan))
    model, targets = attach_lora(base, recipe.adapter, selection)
    check_plan(plan, group_params(model, targets))
    return model, targets, None, plan


@contextlib.contextmanager
def sharded_companion(section: Any, path: Path, base: torch.nn.Module) -> Any:
    """For a routing profile under training.parallel: a companion of `base` (its own skeleton, `base`'s routed experts
    shared) laid out by FSDP2 around the experts, each rank reading only its shards of the rest; dropped after, so
    no rank ever holds the weights outside the experts whole."""
    import gc

    from dsft.models.load import load_companion
    from dsft.models.shards import read_rest, to_meta
    from dsft.moe.parallel import shard_around_experts

    companion = load_companion(section, path, base)
    to_meta(companion)
    shard_around_experts(companion)
    read_rest(companion)
    try:
        yield companion
    finally:
        del companion
        gc.collect()  # FSDP2's states and hooks hold cycles: the shards go now, before the trainer is built


def adapter_meta(model: torch.nn.Module, prepared: Prepared, targets: dict[str, list[str]], identity: dict[str, Any],
                 init_meta: dict[str, Any] | None, goal: "Objective") -> dict[str, Any]:
    """dsft_adapter.json of the run's adapter (and of each checkpoint: it describes the adapter's structure,
    which training does not change)."""
    from dsft.adapters.metadata import build_metadata

    meta = init_meta or build_metadata(model, prepared.recipe.adapter, targets, identity)
    return {**meta, **goal.adapter_metadata(prepared)}


def _save(trainer: Any, prepared: Prepared, run: Path, meta: dict[str, Any]) -> None:
    """The trained adapter (TRL's frozen "ref" copy left out), tokenizer and dsft_adapter.json, written to
    a temporary directory and renamed into place."""
    from dsft.adapters.metadata import write_metadata

    state = full_trainable_state(trainer.model)
    if not is_main():
        return
    tmp = run_dir.adapter_tmp(run)
    trainer.model.save_pretrained(tmp, selected_adapters=["default"], state_dict=state)
    prepared.tokenizer.save_pretrained(tmp)
    write_metadata(tmp, meta)
    lifecycle.publish(tmp, run_dir.adapter_dir(run))


def run(prepared: Prepared, goal: Objective, force: bool, checkpoint: Path | None = None) -> Any:
    """Train `goal` on the prepared data into recipe.output_dir; returns the objective's result."""
    from dsft.models.identity import model_identity
    from dsft.models.load import resolve_dtype
    from dsft.train import resume
    from dsft.train.callbacks import ConsoleProgress, EarlyStop, JsonlMetrics, TrackerFiles
    from dsft.runs.metrics import trim_metrics

    recipe = prepared.recipe
    out = Path(recipe.output_dir)
    identity = model_identity(prepared.model_path, recipe.model.path)
    args = trl_config(goal, recipe, prepared, out, resolve_dtype(recipe.model.dtype))
    with lifecycle.lifecycle(out, recipe, goal.name, identity, force, checkpoint) as info, \
            run_log(run_dir.log(out) if is_main() else None), trackers(recipe, out):
        torch.manual_seed(recipe.training.seed)
        model, targets, init_meta, plan = _policy(prepared, out, identity, info)
        model.create_or_update_model_card = lambda *a, **k: None  # PEFT's boilerplate card: dsft writes its own
        metrics = JsonlMetrics(run_dir.metrics(out))
        progress = ConsoleProgress(f"{goal.name} training", goal.shown, goal.log_parts)
        callbacks = [metrics, progress, TrackerFiles(out, list(recipe.training.report_to))]
        stopping = recipe.training.early_stopping
        early = EarlyStop(stopping.patience, stopping.min_delta) if stopping else None
        with Phase("preparing the trainer (TRL prepares the datasets)", None) if is_main() else contextlib.nullcontext():
            trainer = goal.trainer(model, args, prepared, callbacks + ([early] if early else []))
        quiet_trainer(trainer)
        fp32_adapter(trainer.model)
        apply_layout(trainer, recipe)
        goal.before_train(trainer, prepared)
        if checkpoint is not None and is_main():  # one writer: every rank cutting the same file raced (FSDP2 resume)
            for log in run_dir.step_logs(out):
                trim_metrics(log, run_dir.checkpoint_step(checkpoint))
        meta = adapter_meta(trainer.model, prepared, targets, identity, init_meta, goal)
        try:
            resume.train(trainer, out, goal.name, checkpoint, meta)
        except BaseException as e:  # the display ends as stopped, not with a finished line
            progress.close(e)
            raise
        progress.close()
        extra = goal.after_train(trainer, prepared, out)
        _save(trainer, prepared, out, meta)
        groups = group_params(trainer.model, targets)
        result, own = goal.finish(out, prepared, trainer, metrics, groups, targets, plan, extra)
        summary = {**spine_summary(trainer, prepared, groups, targets), **own}
        if early is not None:  # where training stopped and why, or that it ran to the end
            summary["early_stopping"] = early.report or {"stopped_at_step": None, "patience": stopping.patience,
                                                         "min_delta": stopping.min_delta}
        if is_main():
            write_reports(out, goal, recipe, info, summary, plan)
        lifecycle.complete(out, info, summary)
        return result


def write_reports(run: Path, goal: Objective, recipe: Recipe, info: dict[str, Any], summary: dict[str, Any],
                  plan: dict[str, Any] | None) -> None:
    """curves.png from metrics.jsonl (the objective's panels), and the run's README.md model card."""
    from dsft.train.card import write_card
    from dsft.train.curves import write_curves

    write_curves(run, goal.name, goal.curve_panels(recipe), {"loss": goal.loss_unit})
    write_card(run, goal.name, recipe, info, summary, plan, goal.card_lines(recipe, summary), goal.metric_lines(summary))


