"""KTO (`dsft kto`) over TRL's KTOTrainer: a desirable / undesirable label per completion, unpaired (the
feedback most teams have: thumbs up, thumbs down). Rows are `data.format: kto` ({prompt or messages,
completion, label}) or preference pairs (the chosen answer desirable, the rejected one not).

With `kto.loss_type: kto` the loss estimates a KL term from the other completions of each micro-batch, so a
micro-batch holds at least two rows and sampling is sequential (TRL's requirement); dsft shuffles the rows
once, with training.seed, so that a micro-batch mixes labels whatever the file's order."""

from __future__ import annotations

from typing import Any

import numpy as np

from dsft.config.objectives import KtoSection
from dsft.config.schema import Recipe
from dsft.errors import DsftError
from dsft.train.objective import LOSS_PANELS, Prepared, register
from dsft.train.preference import PairObjective


class KTO(PairObjective):
    name = "kto"
    loss_unit = "KTO loss per completion"
    section = KtoSection
    formats = ("kto", "preference")
    kind = "kto"
    logged = "loss"
    panels = {**LOSS_PANELS,
              "rewards, desirable vs undesirable": (("desirable", "rewards/chosen"), ("undesirable", "rewards/rejected")),
              "reward margin (desirable - undesirable)": (("train", "rewards/margins"), ("eval", "eval_rewards/margins")),
              "KL estimate": (("train", "kl"), ("eval", "eval_kl"))}

    def tokenize(self, recipe: Recipe, tokenizer: Any, rows: None) -> dict[str, Any]:
        prepared = super().tokenize(recipe, tokenizer, rows)
        counts = prepared["data"]["counts"]
        desirable, undesirable = counts.get("desirable", 0), counts.get("undesirable", 0)
        if not desirable or not undesirable:
            label = "true (desirable)" if desirable else "false (undesirable)"
            raise DsftError(f"data.train: every row is labelled {label}; KTO learns from both: add rows labelled "
                            f"{'false' if desirable else 'true'}")
        counts.update(self.weights(self.settings(recipe), desirable, undesirable))
        return prepared

    @staticmethod
    def weights(kto: KtoSection, desirable: int, undesirable: int) -> dict[str, float]:
        """The recipe's weights, or ones that balance the labels: desirable_weight x desirable rows =
        undesirable_weight x undesirable rows (TRL's advice: keep that ratio between 1 and 4/3)."""
        undesirable_weight = kto.undesirable_weight or 1.0
        desirable_weight = kto.desirable_weight or undesirable_weight * undesirable / desirable
        return {"desirable_weight": desirable_weight, "undesirable_weight": undesirable_weight,
                "weights": "recipe" if kto.desirable_weight else "balanced by dsft"}

    def config_class(self) -> type:
        from trl import KTOConfig

        return KTOConfig

    def config_args(self, recipe: Recipe, prepared: Prepared) -> dict[str, Any]:
        kto, counts = self.settings(recipe), prepared.data["counts"]
        return {"beta": kto.beta, "loss_type": kto.loss_type, "desirable_weight": counts["desirable_weight"],
                "undesirable_weight": counts["undesirable_weight"],
                "train_sampling_strategy": "sequential" if kto.loss_type == "kto" else "random"}

    def rows(self, tokens: Any, args: Any) -> Any:
        from dsft.train.trainer import PREPARED_UNPAIRED

        kept = tokens.trainable(args.max_length).select_columns(sorted(PREPARED_UNPAIRED))
        return kept.select(np.random.default_rng(args.seed).permutation(len(kept)))  # labels mixed, sampling sequential

    def trainer_class(self) -> type:
        from dsft.train.trainer import DsftKTOTrainer

        return DsftKTOTrainer


OBJECTIVE = register(KTO())
