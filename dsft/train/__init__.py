"""Training: the spine (`train.pipeline`), the objectives, and what runs around them.

`BUILTIN` is the one table of the built-in objectives: each row is a command (`dsft NAME`), its help, and
the module that defines and registers the objective (its recipe section, TRL config, trainer, panels,
card lines and result table). The CLI makes one command per row (dsft/cli/app.py); tests and docs checks
loop over it. Adding an objective is its module plus a row here. Imports nothing: `dsft --help` stays fast.
"""

from __future__ import annotations

from typing import NamedTuple


class Builtin(NamedTuple):
    module: str
    help: str


BUILTIN: dict[str, Builtin] = {
    "sft": Builtin("dsft.train.sft", "Train a LoRA adapter on the recipe's data; writes adapter, recipe, run.json and "
                   "metrics."),
    "dpo": Builtin("dsft.train.dpo", "Align a model (or an SFT run, dpo.init_adapter) on preference pairs with DPO."),
    "kto": Builtin("dsft.train.kto", "Align on desirable / undesirable completions (unpaired, or preference pairs) "
                   "with KTO."),
    "orpo": Builtin("dsft.train.orpo", "Align on preference pairs with ORPO: SFT loss plus an odds-ratio penalty, no "
                    "reference model."),
    "simpo": Builtin("dsft.train.simpo", "Align on preference pairs with SimPO: length-normalised margins, no "
                     "reference model."),
    "grpo": Builtin("dsft.train.grpo", "Reinforcement learning with verifiable rewards (GRPO): the model generates, the "
                    "recipe's rewards score."),
}
