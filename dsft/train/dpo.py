"""Direct Preference Optimization over TRL's DPOTrainer, with dsft's MoE adapters.

Without `dpo.init_adapter` a fresh adapter is placed as for SFT and the reference is the base model
(TRL's frozen "ref" copy of the fresh adapter, whose B matrices are zero). With it, the SFT adapter
(expert LoRA included) is loaded trainable and TRL's "ref" copy of it, frozen, is the reference: the
SFT model, held as a second adapter on the same base rather than a second model.
"""

from __future__ import annotations

from typing import Any

from dsft.config.objectives import DpoSection
from dsft.config.schema import Recipe
from dsft.train.objective import Prepared, register
from dsft.train.preference import PairObjective


class DPO(PairObjective):
    name = "dpo"
    loss_unit = "DPO loss per pair (sigmoid: -log sigmoid(beta x margin))"
    section = DpoSection

    def config_class(self) -> type:
        from trl import DPOConfig

        return DPOConfig

    def config_args(self, recipe: Recipe, prepared: Prepared) -> dict[str, Any]:
        dpo = self.settings(recipe)
        return {"beta": dpo.beta, "loss_type": [dpo.loss_type], "precompute_ref_log_probs": dpo.precompute_ref}

    def trainer_class(self) -> type:
        from dsft.train.trainer import DsftDPOTrainer

        return DsftDPOTrainer


OBJECTIVE = register(DPO())
