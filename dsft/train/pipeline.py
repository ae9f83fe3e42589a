"""The one training spine every objective runs on.

    preflight: output dir (ownership, lock holder) -> the objective's rows -> model files checked ->
               base config -> SFT adapter to continue (if any) -> expert selection -> disk -> tokenizer ->
               the objective's tokens.                        Creates nothing; every error is one line.
    run:       run directory (lifecycle: recipe.yaml, run.json, status) -> run.log, trackers -> seed ->
               load the base -> choose experts (routing profile for a policy) -> plan -> attach adapters
               (or continue one) -> the objective's trainer -> fp32 masters -> train (checkpoints, resume,
               signals; dsft's progress display) -> the objective's evaluation -> save, publish the
               adapter -> summary -> curves.png, README.md -> complete.

An objective (SFT, DPO, KTO, ORPO, SimPO, GRPO; `register` adds one, tests/test_architecture.py adds one from outside
dsft/) supplies only what differs: its data checks and tokenization, its TRL config and trainer, what it
adds to the adapter's metadata and its summary. The CLI looks objectives up by name in OBJECTIVES.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dsft.config.base import ObjectiveSection
from dsft.config.schema import OPTIMIZERS, Recipe
from dsft.console import Phase, run_log, show
from dsft.errors import DsftError
from dsft.runs import run_dir
from dsft.outputs import is_main
from dsft.train import BUILTIN
from dsft.train.dist import full_trainable_state

OBJECTIVES: dict[str, "Objective"] = {}


@dataclass
class StepsResult:
    """What an objective that reports its first and last logged steps returns (preference objectives, GRPO)."""

    run: Path
    groups: dict[str, int]  # trainable parameters per adapter group
    rows: int
    first: dict[str, float]
    last: dict[str, float]
    counts: dict[str, int]  # rows, truncated, dropped, ...


@dataclass
class Prepared:
    """Everything checked and built before the run directory exists."""

    recipe: Recipe
    model_path: Path
    config: dict[str, Any]
    selection: dict[int, list[int] | None] | None  # None: a policy decides after profiling
    tokenizer: Any
    train: Any  # the training rows' tokens (dsft.data.prepared.Tokens: what trains, and the profiled sample)
    eval: Any | None
    truncation: dict[str, int] | None = None  # what data.max_length cuts (None when packing)
    init_adapter: Path | None = None  # an adapter the run continues (DPO's dpo.init_adapter)
    data: dict[str, Any] = field(default_factory=dict)  # the objective's own prepared data


LOSS_PANELS = {"loss": (("train", "loss"), ("eval", "eval_loss")), "learning rate": (("lr", "learning_rate"),)}


class Objective:
    """What an objective is to the spine: a plug-in. Subclass, set what it declares, override what it does,
    `register` it. Nothing else in dsft names an objective.

    Declares: `name` (its command, and its recipe section's key), `section` (that section's pydantic model,
    a dsft.config.base.ObjectiveSection), `formats` (the data.format values it trains on; a new one is
    registered), `panels` (curves.png: panel title -> (line label, metrics.jsonl key) pairs). Does: its
    data checks and tokens, its TRL config class and the fields it sets there, its trainer, what it adds to
    the adapter's metadata, the model card and run.json's summary. The spine records for every run what
    every run has (dsft.train.pipeline.spine_summary)."""

    name = ""
    section: type[ObjectiveSection] | None = None
    formats: tuple[str, ...] = ()
    panels: dict[str, tuple[tuple[str, str], ...]] = LOSS_PANELS

    mixes = False  # takes data.train's {path, weight | rows} shares (dsft.data.prepared.prepare_mix)
    loss_unit = "loss (nats per token)"  # the y axis of curves.png's loss panel: what the objective's loss is

    def settings(self, recipe: Recipe) -> Any:
        """The recipe's section of this objective, or its defaults when the recipe leaves it out."""
        if self.section is None:
            return None
        return getattr(recipe, self.name, None) or self.section()

    def load_rows(self, recipe: Recipe) -> Any:
        """Check what can be checked of the data before any model file is read (the rows themselves are
        checked as they are tokenized, dsft.data.prepared)."""
        if self.formats and recipe.data.format not in self.formats:
            raise DsftError(f"data.format: `dsft {self.name}` trains on {' or '.join(self.formats)} rows; set data.format "
                            f"to {self.formats[0]} (got {recipe.data.format})")
        for i, fmt in enumerate(recipe.data.file_formats()):
            if self.formats and fmt not in self.formats:
                raise DsftError(f"data.train[{i}].format: `dsft {self.name}` trains on {' or '.join(self.formats)} rows "
                                f"(got {fmt})")
        if recipe.data.shares() and not self.mixes:
            raise DsftError(f"data.train: `dsft {self.name}` takes its files whole; leave weight and rows out of its "
                            "entries (they mix sft data; format and columns work for every objective)")

    def init_adapter(self, recipe: Recipe, config: dict[str, Any]) -> Path | None:
        """An adapter to continue rather than a fresh one (the section's init_adapter), checked against the
        base: the one it was trained on, its tensors and metadata."""
        settings = self.settings(recipe)
        if settings is None or not getattr(settings, "init_adapter", None):
            return None
        return check_init_adapter(recipe, f"{self.name}.init_adapter", Path(settings.init_adapter), config)

    def tokenize(self, recipe: Recipe, tokenizer: Any, rows: Any) -> dict[str, Any]:
        """Prepared's `train`, `eval`, `truncation` and `data` fields."""
        raise NotImplementedError

    def config_class(self) -> type:
        """Its TRL config class; the spine passes it only the arguments it has (trl_config)."""
        raise NotImplementedError

    def config_args(self, recipe: Recipe, prepared: Prepared) -> dict[str, Any]:
        """Its own fields of that config (beta, loss_type, ...)."""
        return {}

    def trainer(self, model: torch.nn.Module, args: Any, prepared: Prepared, callbacks: list[Any]) -> Any:
        raise NotImplementedError

    def after_train(self, trainer: Any, prepared: Prepared, run: Path) -> dict[str, Any]:
        """Work on the trained model before it is saved (SFT: held-out loss, routing change)."""
        return {}

    def adapter_metadata(self, prepared: Prepared) -> dict[str, Any]:
        """Extra keys for the adapter's dsft_adapter.json: by default its section's settings."""
        settings = self.settings(prepared.recipe)
        if settings is None:
            return {}
        return {self.name: {**settings.model_dump(mode="json"),
                            "init_adapter": str(prepared.init_adapter) if prepared.init_adapter else None}}

    def curve_panels(self, recipe: Recipe) -> dict[str, tuple[tuple[str, str], ...]]:
        """curves.png's panels for this recipe (by default `panels`; GRPO adds a line per reward)."""
        return self.panels

    def card_lines(self, recipe: Recipe, summary: dict[str, Any]) -> list[str]:
        """Its lines in the model card's recipe highlights: its section's settings."""
        settings = self.settings(recipe)
        if settings is None:
            return []
        values = ", ".join(f"{k} {v}" for k, v in settings.model_dump().items() if k != "init_adapter" and v is not None)
        return [f"- {self.name}: {values}" + (f", continues `{settings.init_adapter}`" if settings.init_adapter else "")]

    def finish(self, run: Path, prepared: Prepared, trainer: Any, metrics: Any, groups: dict[str, int],
               targets: dict[str, list[str]], plan: dict[str, Any] | None, extra: dict[str, Any]) -> tuple[Any, dict]:
        """(the result the command prints, its fields of run.json's summary)."""
        raise NotImplementedError

    columns: tuple[str, ...] = ("what", "value")  # the command's result table

    def table(self, result: Any) -> list[tuple[str, ...]]:
        """The rows of the command's result table under `columns` (the result `finish` returned)."""
        return []


def register(objective: Objective) -> Objective:
    """Add an objective to OBJECTIVES (the CLI's table), its section to the recipe and its formats to
    data.format's values."""
    from dsft.config.registry import register_format, register_section

    if objective.section is not None:
        register_section(objective.name, objective.section)
    for fmt in objective.formats:
        register_format(fmt)
    OBJECTIVES[objective.name] = objective
    return objective


def unregister(name: str) -> None:
    """Remove a registered objective: its table row, its section and the formats only it trains on (their
    converters too). A built-in one comes back when next named."""
    from dsft.config.registry import unregister as unregister_recipe
    from dsft.data.formats import unregister_converter

    goal = OBJECTIVES.pop(name, None)
    if goal is None:
        return
    others = {fmt for other in OBJECTIVES.values() for fmt in other.formats}
    own = tuple(fmt for fmt in goal.formats if fmt not in others)
    unregister_recipe(name if goal.section is not None else None, own)
    for fmt in own:
        unregister_converter(fmt)


def objective(name: str) -> Objective:
    if name not in OBJECTIVES and name in BUILTIN:
        importlib.import_module(BUILTIN[name].module)  # a built-in objective: its module registers it
    if name not in OBJECTIVES:
        raise DsftError(f"unknown objective {name!r}; known: {', '.join(sorted({*OBJECTIVES, *BUILTIN}))}")
    return OBJECTIVES[name]


def objective_for(recipe: Recipe) -> Objective:
    """The objective a recipe is written for, where no command names it (`dsft experts`, `dsft validate`):
    the one whose section it sets, else the first that trains on its data.format (sft for conversations)."""
    from dsft.config.schema import sections

    named = list(sections(recipe))
    if named:
        return objective(named[0])
    for name in ("sft", *BUILTIN, *OBJECTIVES):
        goal = objective(name)
        if recipe.data.format in goal.formats:
            return goal
    return objective("sft")


def check_init_adapter(recipe: Recipe, key: str, path: Path, config: dict[str, Any]) -> Path:
    """An adapter a run continues: not a training checkpoint, trained on this base (architecture and
    weights), its tensors and metadata checked against it. Returns its adapter directory."""
    from dsft.adapters.metadata import read_metadata
    from dsft.adapters.weights import check_adapter_dir
    from dsft.models.identity import check_base
    from dsft.models.load import resolve_model_path

    run_dir.refuse_checkpoint(path, key)
    _, adapter, _ = run_dir.adapter_source(path, key, "continue")
    check_base(read_metadata(adapter).get("base_model"), resolve_model_path(recipe.model.path, recipe.model.revision), key,
               force_hint=None)
    check_adapter_dir(adapter, key, config)
    return adapter


# ---------------------------------------------------------------- pieces the spine (and objectives) use

def cpu_args() -> dict[str, Any]:
    """Without CUDA: the CPU, and for several processes DDP over gloo. Both flags are needed: without
    `use_cpu` the Trainer runs every rank unwrapped (no gradient all-reduce), each on its own shard."""
    if torch.cuda.is_available():
        return {}
    return {"use_cpu": True, "ddp_backend": "gloo"} if int(os.environ.get("WORLD_SIZE", "1")) > 1 else {"use_cpu": True}


def trainer_args(recipe: Recipe, run: Path, dtype: torch.dtype) -> dict[str, Any]:
    """recipe.training (+ data lengths) -> the TrainingArguments shared by every objective's TRL config.
    dsft sets the precision flags itself: TRL would turn bf16 on by default, which makes CPU runs
    ~100x slower."""
    t = recipe.training
    return dict(
        output_dir=str(run_dir.checkpoints(run)),
        learning_rate=t.lr,
        lr_scheduler_type=t.scheduler,
        # transformers 5.2x takes a float below 1 here as a ratio of the total steps (warmup_ratio is gone)
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
        save_total_limit=t.checkpoints_kept,
        optim=OPTIMIZERS[t.optimizer],
        eval_strategy="steps" if t.eval_steps else "no",
        eval_steps=t.eval_steps,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        **cpu_args(),
        max_length=recipe.data.max_length,
        report_to=list(t.report_to) or "none",
        dataset_num_proc=None,
        dataloader_num_workers=0,
        disable_tqdm=True,  # dsft's own display (dsft.train.callbacks.ConsoleProgress)
        average_tokens_across_devices=True,  # the loss of N processes equals one process's at the same global batch
        ddp_find_unused_parameters=False,
        # The balance loss is dsft's (training.balance_loss, dsft.moe.balance) for every family; TRL would
        # otherwise add Qwen-MoE's / Mixtral's router aux loss unasked.
        router_aux_loss_coef=0.0,
    )


# training.report_to: the package each tracker needs, and the variables that keep its files inside the run
# (set only where the user has not set them; wandb offline, so a run never needs a network).
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def check_trackers(recipe: Recipe) -> None:
    import importlib.util

    missing = [t for t in recipe.training.report_to if importlib.util.find_spec(TRACKER_PACKAGES[t]) is None]
    if missing:
        raise DsftError("; ".join(f"training.report_to: {t} is not installed; pip install {TRACKER_PACKAGES[t]} "
                                  f"(or `pip install dsft[{t}]`), or remove {t} from training.report_to" for t in missing))


def tracker_env(recipe: Recipe, run: Path) -> dict[str, str]:
    """The environment variables that point the recipe's trackers into the run directory."""
    env: dict[str, str] = {}
    for tracker in recipe.training.report_to:
        where = str(run_dir.tracker_dir(run, tracker).resolve())
        env |= {"tensorboard": {"TENSORBOARD_LOGGING_DIR": where},
                # MLflow 3 refuses a file store unless told (its database store needs sqlalchemy)
                "mlflow": {"MLFLOW_TRACKING_URI": Path(where).as_uri(), "MLFLOW_ALLOW_FILE_STORE": "true"},
                "wandb": {"WANDB_DIR": str(Path(where).parent), "WANDB_MODE": "offline", "WANDB_SILENT": "true",
                          "WANDB_CONSOLE": "off"}}[tracker]  # wandb's own console lines stay off dsft's
    return {k: v for k, v in env.items() if k not in os.environ}


def check_optimizer(recipe: Recipe) -> None:
    """bitsandbytes' 8-bit optimizers run on CUDA only: refused up front elsewhere, not at the first step."""
    name = recipe.training.optimizer
    if name == "adamw":
        return
    if not torch.cuda.is_available():
        raise DsftError(f"training.optimizer: {name} (bitsandbytes' 8-bit optimizer states) needs a CUDA GPU and "
                        "this machine has none; use adamw here")
    from importlib.util import find_spec

    if find_spec("bitsandbytes") is None:
        raise DsftError(f"training.optimizer: {name} needs bitsandbytes; pip install bitsandbytes, or use adamw")


def check_disk_for(recipe: Recipe, config: dict[str, Any], selection: dict[int, list[int] | None] | None) -> None:
    """Room for this recipe's checkpoints; a policy's selection is not known yet, so count every expert."""
    from dsft.adapters.plan import build_plan
    from dsft.adapters.selection import moe_layout

    if selection is None:
        selection = dict.fromkeys(moe_layout(config)[0])
    run_dir.check_disk(Path(recipe.output_dir), build_plan(recipe, config, selection)["trainable_params"],
                       recipe.training.checkpoints_kept)


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


def fp32_adapter(model: torch.nn.Module) -> None:
    """Keep trainable weights in fp32: TRL casts them to bf16 on 4-bit models, and a trainable
    router is copied in the base dtype."""
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()


def target_experts(prepared: Prepared, model: torch.nn.Module, run: Path, identity: dict[str, Any],
                   data_sha: dict[str, str]) -> tuple[dict[int, list[int] | None], dict[str, Any] | None]:
    """The static selection, or the policy applied to the (cached) routing profile; and what the plan says of
    the profile (None without one)."""
    if prepared.selection is not None:
        return prepared.selection, None
    from dsft.train.targeting import ROUTING_DIR, ensure_profile, policy_selection, profile_key, profile_summary

    spec = prepared.recipe.adapter.routed_experts
    key = profile_key(prepared.recipe, identity, data_sha, spec.samples, spec.count)
    profile, computed = ensure_profile(model, prepared.recipe, prepared.train, prepared.tokenizer.pad_token_id, key,
                                       run / ROUTING_DIR, spec.samples, spec.count)
    return policy_selection(prepared.recipe, profile, run / ROUTING_DIR), profile_summary(profile, computed)


def resume_point(recipe: Recipe, resume: bool, resume_from: str | None, dry: bool = False) -> Path | None:
    """The checkpoint to resume from (checked against the run and its recipe), or None; `dry` only checks."""
    if not (resume or resume_from):
        return None
    from dsft.train.resume import prepare_resume

    return prepare_resume(Path(recipe.output_dir), run_dir.resolved_recipe(recipe), resume_from, dry)


# ---------------------------------------------------------------- the spine

def preflight(recipe: Recipe, goal: Objective, force: bool, check_output: bool = True, resume: bool = False) -> Prepared:
    """Check the output dir, every data row, the model files and the expert selection, and tokenize;
    creates nothing."""
    from dsft.adapters.selection import check_groups, check_spec, read_config
    from dsft.models.check import check_checkpoint
    from dsft.models.load import load_tokenizer, resolve_model_path

    from dsft.config.schema import foreign_section

    problem = foreign_section(recipe, goal.name)
    if problem:
        raise DsftError(problem)
    if check_output:
        run_dir.check_output_dir(Path(recipe.output_dir), force, resume, run_dir.run_inputs(recipe))
    check_trackers(recipe)
    check_optimizer(recipe)
    rows = goal.load_rows(recipe)
    model_path = resolve_model_path(recipe.model.path, recipe.model.revision)
    check_checkpoint(model_path)
    config = read_config(model_path)
    init = goal.init_adapter(recipe, config)
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
    from dsft.train.targeting import check_plan, data_summary, write_plan

    recipe = prepared.recipe
    base = load_model(recipe.model, prepared.model_path)
    if prepared.init_adapter is not None:
        model = load_lora(base, str(prepared.init_adapter), is_trainable=True)
        meta = read_metadata(prepared.init_adapter)
        return model, recorded_targets(meta), meta, None
    selection, profile = target_experts(prepared, base, run, identity, info["data_sha256"])
    plan = write_plan(run, recipe, prepared.config, selection, data_summary(prepared.train, prepared.eval), profile)
    if is_main():
        show(plan_table(plan))
    model, targets = attach_lora(base, recipe.adapter, selection)
    check_plan(plan, group_params(model, targets))
    return model, targets, None, plan


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
    run_dir.publish(tmp, run_dir.adapter_dir(run))


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
    with run_dir.lifecycle(out, recipe, goal.name, identity, force, checkpoint) as info, \
            run_log(run_dir.log(out)) if is_main() else contextlib.nullcontext(), trackers(recipe, out):
        torch.manual_seed(recipe.training.seed)
        model, targets, init_meta, plan = _policy(prepared, out, identity, info)
        model.create_or_update_model_card = lambda *a, **k: None  # PEFT's boilerplate card: dsft writes its own
        metrics = JsonlMetrics(run_dir.metrics(out))
        progress = ConsoleProgress(f"{goal.name} training")
        callbacks = [metrics, progress, TrackerFiles(out, list(recipe.training.report_to))]
        stopping = recipe.training.early_stopping
        early = EarlyStop(stopping.patience, stopping.min_delta) if stopping else None
        with Phase("preparing the trainer (TRL prepares the datasets)", None) if is_main() else contextlib.nullcontext():
            trainer = goal.trainer(model, args, prepared, callbacks + ([early] if early else []))
        quiet_trainer(trainer)
        fp32_adapter(trainer.model)
        if checkpoint is not None:
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
        run_dir.complete(out, info, summary)
        return result


def quiet_trainer(trainer: Any) -> None:
    """The Trainer prints each logged dict (PrinterCallback) when its tqdm bar is off; dsft shows them."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)


@contextlib.contextmanager
def trackers(recipe: Recipe, run: Path):
    """The recipe's trackers pointed into the run for the block (tracker_env), and their runs ended before
    the variables are restored: MLflow's callback would otherwise end its run when it is garbage collected,
    after the block, against a default store in the working directory."""
    import sys

    env = tracker_env(recipe, run)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    if "mlflow" in recipe.training.report_to and is_main():  # one MLflow run for training and the final eval:
        import mlflow  # the callback ends only a run it started itself

        mlflow.start_run(run_name=run.name)
    try:
        yield
    finally:
        if "mlflow" in recipe.training.report_to and "mlflow" in sys.modules and sys.modules["mlflow"].active_run():
            sys.modules["mlflow"].end_run()
        if "wandb" in recipe.training.report_to and "wandb" in sys.modules and sys.modules["wandb"].run is not None:
            sys.modules["wandb"].finish()
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def write_reports(run: Path, goal: Objective, recipe: Recipe, info: dict[str, Any], summary: dict[str, Any],
                  plan: dict[str, Any] | None) -> None:
    """curves.png from metrics.jsonl (the objective's panels), and the run's README.md model card."""
    from dsft.train.card import write_card
    from dsft.train.curves import write_curves

    write_curves(run, goal.name, goal.curve_panels(recipe), {"loss": goal.loss_unit})
    write_card(run, goal.name, recipe, info, summary, plan, goal.card_lines(recipe, summary))


def trl_config(goal: Objective, recipe: Recipe, prepared: Prepared, run: Path, dtype: torch.dtype) -> Any:
    """The objective's TRL config: of the spine's arguments (trainer_args) the ones its class has, then its
    own (GRPOConfig has no max_length, ORPOConfig and CPOConfig no router_aux_loss_coef)."""
    import dataclasses

    cls = goal.config_class()
    accepted = {f.name for f in dataclasses.fields(cls)}
    args = {k: v for k, v in trainer_args(recipe, run, dtype).items() if k in accepted}
    return cls(**{**args, **goal.config_args(recipe, prepared)})


def spine_summary(trainer: Any, prepared: Prepared, groups: dict[str, int], targets: dict[str, list[str]]) -> dict[str, Any]:
    """What run.json's summary holds for every run, whatever its objective: trainable parameters by group,
    the tokens of its rows, peak memory, processes, how the NF4 expert codes were held, the adapted modules."""
    import numpy as np

    from dsft.models.load import world_size

    max_length = prepared.recipe.data.max_length
    return {"trainable_params": {g: n for g, n in groups.items() if n},
            "train_rows": len(prepared.train),
            "train_tokens": int(np.minimum(prepared.train.column("length"), max_length).sum()),
            "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
            "peak_host_gib": peak_host_gib(), "processes": world_size(),
            "expert_codes": expert_codes_layout(trainer.model), "targets": targets,
            **({"data_mix": prepared.train.meta["mix"]} if prepared.train.meta.get("mix") else {})}


def peak_host_gib() -> float | None:
    """This process's peak resident memory so far (Linux and macOS), in GiB."""
    try:
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    except (ImportError, OSError):
        return None
    return peak / (2**30 if sys.platform == "darwin" else 2**20)


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
