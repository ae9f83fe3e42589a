"""The training settings every objective shares: the TrainingArguments from recipe.training (`trainer_args`, on
CPU `cpu_args`), an objective's TRL config given only the fields its class has (`trl_config`), the optimizer
and trackers checked up front, and the trackers pointed into the run directory while it trains."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import torch

from dsft.config.schema import OPTIMIZERS, Recipe
from dsft.errors import DsftError
from dsft.outputs import is_main
from dsft.runs import run_dir
from dsft.train.layout import processes
from dsft.train.objective import Objective, Prepared

def cpu_args() -> dict[str, Any]:
    """Without CUDA: the CPU, and for several processes DDP over gloo. Both flags are needed: without
    `use_cpu` the Trainer runs every rank unwrapped (no gradient all-reduce), each on its own shard."""
    if torch.cuda.is_available():
        return {}
    return {"use_cpu": True, "ddp_backend": "gloo"} if processes() > 1 else {"use_cpu": True}


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


def trl_config(goal: Objective, recipe: Recipe, prepared: Prepared, run: Path, dtype: torch.dtype) -> Any:
    """The objective's TRL config: of the spine's arguments (trainer_args) the ones its class has, then its
    own (GRPOConfig has no max_length, ORPOConfig and CPOConfig no router_aux_loss_coef)."""
    import dataclasses

    cls = goal.config_class()
    accepted = {f.name for f in dataclasses.fields(cls)}
    args = {k: v for k, v in trainer_args(recipe, run, dtype).items() if k in accepted}
    return cls(**{**args, **goal.config_args(recipe, prepared)})
