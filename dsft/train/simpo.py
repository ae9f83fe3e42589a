"""SimPO (`dsft simpo`) over TRL's experimental CPOTrainer with `loss_type: simpo` and no behaviour-cloning
term (`cpo_alpha: 0`): the margin between length-normalised log-probabilities of the chosen and rejected
answers, pushed past `simpo.gamma`; no reference model."""

from __future__ import annotations

from typing import Any

from dsft.config.objectives import SimpoSection
from dsft.config.schema import Recipe
from dsft.train.orpo import ORPO
from dsft.train.objective import Prepared, register


class SimPO(ORPO):
    name = "simpo"
    loss_unit = "SimPO loss per pair (-log sigmoid)"
    section = SimpoSection
    module, trainer_name, config_name = "cpo", "CPOTrainer", "CPOConfig"

    def config_args(self, recipe: Recipe, prepared: Prepared) -> dict[str, Any]:
        simpo = self.settings(recipe)
        return {"loss_type": "simpo", "cpo_alpha": 0.0, "beta": simpo.beta, "simpo_gamma": simpo.gamma}


OBJECTIVE = register(SimPO())
