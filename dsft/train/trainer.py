"""TRL's trainers plus what DeepSeek MoE training needs from them: the model's own balance loss (SFT),
and resuming an adapter under FSDP2 (SFT and DPO)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trl import DPOTrainer, SFTTrainer

from dsft.config.schema import TrainingSection


class FsdpAdapterResume:
    """Under FSDP2 the Trainer reloads a checkpoint's model through torch.distributed.checkpoint from
    the FSDP model file, which also holds bitsandbytes' 4-bit quant-state entries that the loader then
    rejects (KeyError). The checkpoint's adapter_model.safetensors holds the same trainable weights:
    load those into the sharded parameters instead. The optimizer and scheduler still come from the
    Trainer's own files."""

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        if not getattr(self, "is_fsdp_enabled", False):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        from dsft.train.dist import load_full_trainable_state

        load_full_trainable_state(self.model, Path(resume_from_checkpoint) / "adapter_model.safetensors")
        return None

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        """TRL's card ("fine-tuned version of [None]...") is not written; the run's README.md is dsft's."""


class DsftDPOTrainer(FsdpAdapterResume, DPOTrainer):
    pass


class DsftSFTTrainer(FsdpAdapterResume, SFTTrainer):
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
