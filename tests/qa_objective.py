"""An objective written outside dsft, as one module: its recipe section (`qa:`), its data format (question /
answer rows), its config class, its trainer, its result and result table. tests/test_objectives.py adds a
row for it to dsft.train.BUILTIN and runs it as a command; nothing under dsft/ names it, and it subclasses no
built-in objective."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from transformers import Trainer, TrainingArguments
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from dsft.config.base import ObjectiveSection
from dsft.data.formats import RowError, register_converter
from dsft.data.prepared import Spec, prepare
from dsft.train import objective as plugins
from dsft.train.trainer import MaskCollator, trainer_rows

NAME = "qa"


class QaSection(ObjectiveSection):
    """An objective's own recipe section (`qa:`)."""

    loss_scale: float = 1.0


@dataclass
class QaArgs(TrainingArguments):
    """A config class of its own: plain TrainingArguments (no max_length, no router_aux_loss_coef) plus its field."""

    loss_scale: float = field(default=1.0)


class QaTrainer(Trainer):
    """A trainer of its own: the causal-LM loss scaled by the section's loss_scale."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        return (loss[0] * self.args.loss_scale, loss[1]) if return_outputs else loss * self.args.loss_scale


def qa_messages(row: dict) -> list:
    """Its own data format: question / answer rows."""
    if not isinstance(row.get("q"), str) or not isinstance(row.get("a"), str):
        raise RowError("a qa row has string fields q and a")
    return [{"role": "user", "content": row["q"]}, {"role": "assistant", "content": row["a"]}]


@dataclass
class QaResult:
    run: Path
    losses: list[float]


class Qa(plugins.Objective):
    name, section, formats = NAME, QaSection, ("qa",)
    columns = ("what", "value")
    shown = {"epoch": "epoch"}  # its console key, after the learning rate

    def metric_lines(self, summary):
        return [f"- qa: first loss {summary['qa_first_loss']:.4g} (training data)"]

    def tokenize(self, recipe, tokenizer, rows):
        data = recipe.data
        train = prepare(Spec("sft", list(data.train), data.format, "data.train"), tokenizer)
        return {"train": train, "eval": None, "truncation": train.stats(data.max_length)}

    def config_class(self):
        return QaArgs

    def config_args(self, recipe, prepared):
        return {"loss_scale": self.settings(recipe).loss_scale, "remove_unused_columns": False}

    def trainer(self, model, args, prepared, callbacks):
        max_length = prepared.recipe.data.max_length
        collator = MaskCollator(DataCollatorForLanguageModeling(pad_token_id=prepared.tokenizer.pad_token_id), max_length)
        return QaTrainer(model=model, args=args, train_dataset=trainer_rows(prepared.train, args, max_length),
                         data_collator=collator, callbacks=callbacks)

    def finish(self, run, prepared, trainer, metrics, groups, targets, plan, extra):
        losses = metrics.losses()
        return QaResult(run, losses), {"qa_first_loss": losses[0], "qa_scale": self.settings(prepared.recipe).loss_scale}

    def table(self, result):
        return [("qa loss first -> last", f"{result.losses[0]:.3f} -> {result.losses[-1]:.3f}")]


register_converter(NAME, qa_messages)
OBJECTIVE = plugins.register(Qa())
