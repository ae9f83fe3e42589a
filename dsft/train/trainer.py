"""TRL's SFTTrainer plus what DeepSeek MoE training needs from it: the model's own balance loss."""

from __future__ import annotations

from typing import Any

from trl import SFTTrainer

from dsft.config.schema import TrainingSection


class DsftSFTTrainer(SFTTrainer):
    def __init__(self, *args: Any, balance: TrainingSection | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.balance = None
        if balance is not None and balance.balance_loss:
            from dsft.moe.balance import for_model

            self.balance = for_model(self.model, balance.balance_loss_alpha)

    def compute_loss(self, model: Any, inputs: dict, return_outputs: bool = False, num_items_in_batch: Any = None):
        if self.balance is None or not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self.balance.start(inputs.get("attention_mask"))
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        extra = self.balance.finish()
        if num_items_in_batch is not None:  # the Trainer leaves gradient accumulation to the loss
            extra = extra / self.current_gradient_accumulation_steps
        metrics = getattr(self, "_metrics", None)
        if metrics is not None:
            metrics["train"]["balance_loss"].append(float(extra.detach()))
        return (result[0] + extra, result[1]) if return_outputs else result + extra
