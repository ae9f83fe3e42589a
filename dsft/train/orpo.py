"""ORPO (`dsft orpo`) over TRL's experimental ORPOTrainer: the SFT loss on the chosen answer plus a
log-odds-ratio penalty on the rejected one, with no reference model (so no reference forward pass per
step). Starts from the base, or continues an SFT adapter (orpo.init_adapter)."""

from __future__ import annotations

from typing import Any

from dsft.config.objectives import OrpoSection
from dsft.config.schema import Recipe
from dsft.train.objective import Prepared, register
from dsft.train.preference import PairObjective


class ORPO(PairObjective):
    name = "orpo"
    loss_unit = "nats per token + beta x odds-ratio loss"
    section = OrpoSection
    module, trainer_name, config_name = "orpo", "ORPOTrainer", "ORPOConfig"

    def load_rows(self, recipe: Recipe) -> None:
        super().load_rows(recipe)
        self.config_class()  # a TRL without trl.experimental stops here, before anything is created

    def config_class(self) -> type:
        from dsft.train.experimental import load

        return load(self.module, self.config_name)[0]

    def config_args(self, recipe: Recipe, prepared: Prepared) -> dict[str, Any]:
        return {"beta": self.settings(recipe).beta}

    def trainer_class(self) -> type:
        from dsft.train.trainer import legacy_pair_trainer

        return legacy_pair_trainer(self.module, self.trainer_name)


OBJECTIVE = register(ORPO())
