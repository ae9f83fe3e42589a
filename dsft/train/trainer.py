"""TRL's trainers plus what DeepSeek MoE training needs from them: the model's own balance loss (SFT),
saving and resuming an adapter split by training.parallel (SFT and DPO), and dsft's prepared rows taken as they are (every row was
tokenized once, into dsft's cache: TRL neither tokenizes nor maps them again)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from trl import DPOTrainer, GRPOTrainer, KTOTrainer, SFTTrainer

from dsft.config.schema import TrainingSection

SCHEDULER_FILE = "scheduler.pt"  # the Trainer's name for it


class FsdpAdapterResume:
    """A model split by training.parallel (FSDP2, with or without expert parallelism; sharded at load time, to the
    Trainer) resumes from the checkpoint's adapter_model.safetensors loaded into its shards, and writes and reads
    its sharded optimizer state through torch.distributed.checkpoint."""

    def _split(self) -> bool:
        return getattr(self, "is_distributed_loading_by_transformers", False)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        if not self._split():
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        from dsft.train.dist import load_full_trainable_state

        load_full_trainable_state(self.model, Path(resume_from_checkpoint) / "adapter_model.safetensors")
        return None

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self._split():
            return super()._save_optimizer_and_scheduler(output_dir)
        import torch

        from dsft.train.dist import save_sharded_optimizer

        save_sharded_optimizer(self.model, self.optimizer, Path(output_dir))
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), Path(output_dir) / SCHEDULER_FILE)
        return None

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None or not self._split():
            return super()._load_optimizer_and_scheduler(checkpoint)
        import torch

        from dsft.train.dist import load_sharded_optimizer

        load_sharded_optimizer(self.model, self.optimizer, Path(checkpoint))
        self.lr_scheduler.load_state_dict(torch.load(Path(checkpoint) / SCHEDULER_FILE, weights_only=True))
        return None

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """A model sharded at load time (training.parallel) saves its adapter gathered from the shards (every rank
        takes part; the main rank writes), not PEFT's state dict of sharded tensors."""
        if state_dict is None and self._split():
            from dsft.train.dist import full_trainable_state

            state_dict = full_trainable_state(self.model)
        return super()._save(output_dir, state_dict)

    @contextlib.contextmanager
    def _root_unsharded(self) -> Any:
        """Generation calls the model inside the FSDP2 root (PEFT's wrapper), whose hooks gather the root's own
        weights (embeddings, final norm, LM head): they are gathered around it here (the decoder layers gather
        their own)."""
        if not (self._split() and hasattr(self.model, "unshard")):
            yield
            return
        self.model._get_fsdp_state()._lazy_init()  # the root first, as its own forward would (else a layer's is)
        self.model.unshard()
        try:
            yield
        finally:
            self.model.reshard()

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        """TRL's card ("fine-tuned version of [None]...") is not written; the run's README.md is dsft's."""


class DsftDPOTrainer(FsdpAdapterResume, DPOTrainer):
    def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
        """dsft's rows hold prompt_ids, chosen_ids and rejected_ids, tokenized as this method would
        (dsft.data.preference.tokenize_answers) and with its filter applied (Tokens.trainable)."""
        if PREPARED_PAIRS <= set(dataset.column_names):
            return dataset
        return super()._prepare_dataset(dataset, processing_class, args, dataset_name)


PREPARED_PAIRS = {"prompt_ids", "chosen_ids", "rejected_ids"}
PREPARED_UNPAIRED = {"prompt_ids", "completion_ids", "label"}


class DsftKTOTrainer(FsdpAdapterResume, KTOTrainer):
    """KTO on dsft's rows (prompt_ids, completion_ids, label: tokenized as KTOTrainer would, its filter
    applied). The KL completions KTOTrainer would add by rolling each micro-batch's completions by one are
    made the same way by the collator (sampling stays sequential, as TRL requires)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.calculate_KL and not isinstance(self.data_collator, KlCollator):
            self.data_collator = KlCollator(self.data_collator)

    def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
        if PREPARED_UNPAIRED <= set(dataset.column_names):
            return dataset
        return super()._prepare_dataset(dataset, processing_class, args, dataset_name)


class KlCollator:
    """Each example's mismatched KL completion: the previous example's in the micro-batch (the first takes the
    last's), as KTOTrainer's batched map makes them."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        completions = [e["completion_ids"] for e in examples]
        rolled = [completions[-1], *completions[:-1]]
        return self.inner([{**e, "KL_completion_ids": kl} for e, kl in zip(examples, rolled)])


class PairRowsCollator:
    """dsft's pair rows as the older pair trainers (ORPO, CPO) tokenize them in their `tokenize_row`: prompt +
    answer (the answer cut so that the two fit max_length), the answer's labels, the prompt; then their own
    collator pads."""

    def __init__(self, inner: Any, max_length: int) -> None:
        self.inner, self.max_length = inner, max_length

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        rows = []
        for e in examples:
            prompt = list(e["prompt_ids"])
            row = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
            for side in ("chosen", "rejected"):
                answer = list(e[f"{side}_ids"])[: max(0, self.max_length - len(prompt))]
                row[f"{side}_input_ids"] = prompt + answer
                row[f"{side}_attention_mask"] = [1] * (len(prompt) + len(answer))
                row[f"{side}_labels"] = [-100] * len(prompt) + answer
            rows.append(row)
        return self.inner(rows)


_LEGACY: dict[str, type] = {}


def legacy_pair_trainer(module: str, name: str) -> type:
    """An older TRL pair trainer (trl.experimental: orpo.ORPOTrainer, cpo.CPOTrainer) on dsft's rows. These
    tokenize their datasets in __init__ with no switch to skip it, so they are built on an empty dataset and
    given dsft's rows afterwards, with PairRowsCollator in front of their collator."""
    if name not in _LEGACY:
        from datasets import Dataset

        from dsft.train.experimental import load

        (base,) = load(module, name)

        class Trainer(FsdpAdapterResume, base):
            def __init__(self, *args: Any, train_dataset: Any, eval_dataset: Any = None, **kwargs: Any) -> None:
                empty = Dataset.from_dict({"prompt": [], "chosen": [], "rejected": []})
                super().__init__(*args, train_dataset=empty, eval_dataset=empty if eval_dataset is not None else None,
                                 **kwargs)
                self.train_dataset, self.eval_dataset = train_dataset, eval_dataset
                self.data_collator = PairRowsCollator(self.data_collator, self.max_length)

            def concatenated_forward(self, model: Any, batch: dict[str, Any]) -> tuple:
                """Their NLL term is a mean over the micro-batch's tokens; on N processes it is rescaled so that
                DDP's average of the N means is the mean over all their tokens, as on one process."""
                out = super().concatenated_forward(model, batch)
                world = self.accelerator.num_processes
                if world == 1:
                    return out
                local = batch["chosen_attention_mask"][:, 1:].sum().float()
                total = self.accelerator.reduce(local.clone(), reduction="sum")
                return (*out[:4], out[4] * (local * world / total), *out[5:])

        Trainer.__name__ = Trainer.__qualname__ = f"Dsft{name}"
        _LEGACY[name] = Trainer
    return _LEGACY[name]


def trainer_rows(tokens: Any, args: Any, max_length: int) -> Any:
    """The rows SFTTrainer trains on, from dsft's prepared tokens (dsft.data.prepared.Tokens): those with a
    loss token within max_length, their ids and loss mask only, packed as TRL packs when args.packing (the
    packed rows are written once beside the entry, by datasets' own cache)."""
    dataset = tokens.trainable(max_length).select_columns(["input_ids", "loss_mask"])
    if not getattr(args, "packing", False):
        return dataset
    from trl.data_utils import pack_dataset

    return pack_dataset(dataset, max_length, args.packing_strategy, map_kwargs={"desc": None})


class MaskCollator:
    """Labels from dsft's loss mask (IGNORE off the loss), each row cut to max_length as TRL's preparation
    would, then TRL's own collator (padding, packing's position ids)."""

    def __init__(self, inner: Any, max_length: int | None) -> None:
        self.inner, self.max_length = inner, max_length

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        import numpy as np

        rows = []
        for example in examples:
            ids = np.asarray(example["input_ids"][: self.max_length], dtype=np.int64)
            mask = np.asarray(example["loss_mask"][: self.max_length], dtype=bool)
            row = {"input_ids": ids.tolist(), "labels": np.where(mask, ids, -100).tolist()}
            if "seq_lengths" in example:
                row["seq_lengths"] = example["seq_lengths"]
            rows.append(row)
        return self.inner(rows)


class DsftSFTTrainer(FsdpAdapterResume, SFTTrainer):
    def __init__(self, *args: Any, balance: TrainingSection | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.data_collator, MaskCollator):
            self.data_collator = MaskCollator(self.data_collator, None if self.args.packing else self.args.max_length)
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


FLAT_WINDOW = 3  # logged steps in a row with no reward spread before the console says the run is not learning


class DsftGRPOTrainer(FsdpAdapterResume, GRPOTrainer):
    """GRPO with dsft's adapters: a fresh adapter's reference (beta > 0) is the adapter switched off, not a
    "ref" copy of it (TRL copies any adapter it is given; an SFT adapter continued keeps that frozen copy).
    Each logged step also records the time split between generating and training with generated tokens/s,
    and appends a few prompts, completions and their rewards to `completions` (RUN/completions.jsonl)."""

    def __init__(self, *args: Any, fresh: bool = False, completions: Path | None = None, shown: int = 4,
                 **kwargs: Any) -> None:
        import time

        config = kwargs["args"]
        beta = config.beta
        if fresh:
            config.beta = 0.0  # TRL then makes no "ref" copy; the adapter switched off is the reference
        try:
            super().__init__(*args, **kwargs)
        finally:
            config.beta = beta
        self.beta = beta
        self.completions_path, self.shown = completions, shown
        self.timing = {"generation": 0.0, "tokens": 0, "since": time.monotonic()}
        self.scored_any, self.unscored_said = False, False
        self.flat_steps: list[int] = []  # logged steps in a row where no group had any reward spread

    def _calculate_rewards(self, inputs: list, prompts: list, completions: list, completion_ids_list: list) -> Any:
        """TRL's rewards of a generation, and a stop when nothing has been scored: a run whose first generation no
        reward scored (every reward None for every completion, across processes) would train on nothing and report
        complete; later unscored generations are said once (they carry no signal)."""
        import torch

        from dsft.data.prompts import ROW
        from dsft.train.rewards import RewardError

        rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        if not self.model.training:
            return rewards
        if not bool(torch.isnan(rewards).all()):
            self.scored_any = True
            return rewards
        where = next((r.get(ROW) for r in inputs if r.get(ROW)), None) or "an unknown row"
        if not self.scored_any:
            raise RewardError(f"grpo.rewards: no completion of the first generation was scored (every reward returned "
                              f"None for all {rewards.shape[0]} completions; the batch has the row at {where}); a run "
                              "scoring nothing trains nothing: give the rows what the rewards read (answer_match: an "
                              "`answer`), or make the function return numbers")
        if not self.unscored_said:
            from dsft.console import say

            say(f"warning: step {self.state.global_step + 1}: no completion of this generation was scored (every reward "
                f"returned None; the batch has the row at {where}); it trains nothing", stderr=True)
            self.unscored_said = True
        return rewards

    def _generate(self, prompts: list) -> tuple:
        import time

        start = time.monotonic()
        with self._root_unsharded():
            out = super()._generate(prompts)
        if self.model.training:
            self.timing["generation"] += time.monotonic() - start
            self.timing["tokens"] += sum(len(ids) for ids in out[1])
        return out

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        import time

        step_row = self.model.training and "loss" in logs
        if step_row:
            now, t = time.monotonic(), self.timing
            wall, generation = now - t["since"], t["generation"]
            logs["time/generation_s"] = round(generation, 3)
            logs["time/training_s"] = round(max(0.0, wall - generation), 3)
            logs["generation/tokens_per_s"] = round(t["tokens"] / generation, 1) if generation else 0.0
            self.timing = {"generation": 0.0, "tokens": 0, "since": now}
        super().log(logs, start_time)
        if step_row:
            self.watch_spread(logs)
        if step_row and self.completions_path is not None and self.shown and self.accelerator.is_main_process:
            self.write_completions()

    def watch_spread(self, logs: dict[str, float]) -> None:
        """Say once when FLAT_WINDOW logged steps in a row had no reward spread in any group
        (frac_reward_zero_std 1: every advantage 0, loss 0, nothing learned); curves.png draws the share too."""
        if logs.get("frac_reward_zero_std", 0.0) < 1.0 - 1e-9:
            self.flat_steps = []
            return
        self.flat_steps.append(self.state.global_step)
        if len(self.flat_steps) == FLAT_WINDOW and self.accelerator.is_main_process:
            from dsft.console import say

            say(f"warning: steps {self.flat_steps[0]}-{self.flat_steps[-1]}: every group's completions got the same "
                f"reward ({FLAT_WINDOW} logged steps in a row with frac_reward_zero_std 1.0): every advantage is 0 and "
                "nothing is learned; make the rewards tell completions apart (partial credit), raise grpo.temperature or "
                "grpo.num_generations, or start from an SFT run that sometimes succeeds", stderr=True)

    def write_completions(self) -> None:
        """The first `shown` completions of the latest generation (TRL keeps them gathered from every process),
        with each reward's score and the advantage they trained with."""
        import json

        logs = self._logs
        rows = []
        for i, (prompt, completion) in enumerate(zip(list(logs["prompt"]), list(logs["completion"]))):
            if i == self.shown:
                break
            rewards = {name: _finite(list(values)[i]) for name, values in logs["rewards"].items()}
            rows.append({"step": self.state.global_step, "prompt": _text(prompt), "completion": _text(completion),
                         "rewards": rewards, "advantage": _finite(list(logs["advantages"])[i])})
        with self.completions_path.open("a", encoding="utf-8") as f:
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _text(value: Any) -> str:
    """A prompt's last message or a completion's text (conversational or plain)."""
    if isinstance(value, list) and value and isinstance(value[-1], dict):
        return str(value[-1].get("content", ""))
    return str(value)


def _finite(value: Any) -> float | None:
    import math

    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None
