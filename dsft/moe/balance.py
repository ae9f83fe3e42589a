"""The model's own load-balance loss, which transformers 5.23 does not compute for DeepSeek-V2/V3
(and TRL's `router_aux_loss_coef` crashes on them).

For each MoE layer, with N experts, top-k K, a token's affinities s over the experts and
f_i = N / (K T) * (tokens selecting expert i), P_i = mean over tokens of s_i, the loss is
alpha * sum_i f_i P_i, summed over layers:
- DeepSeek-V2: expert-level, over all tokens of the micro-batch, s = softmax(router logits);
- DeepSeek-V3: sequence-wise, per sequence then averaged, s = sigmoid(logits) normalised to sum 1;
- Qwen-MoE, Mixtral: as DeepSeek-V2 (transformers' `load_balancing_loss_func` is the same sum, averaged
  over layers instead of summed; the recipe's alpha absorbs the difference).
Padding tokens do not count. dsft computes it for every family and switches TRL's own aux loss off.
"""

from __future__ import annotations

import torch
from torch import nn

from dsft.moe.routing import routers


def balance_term(logits: torch.Tensor, index: torch.Tensor, mask: torch.Tensor, batch: int,
                 sequence_wise: bool) -> torch.Tensor:
    """logits [B*T, N], index [B*T, K], mask [B*T] (1 for real tokens)."""
    num, k = logits.shape[-1], index.shape[-1]
    hits = torch.zeros_like(logits, dtype=torch.float32).scatter_(1, index, 1.0)
    m = mask.float().unsqueeze(-1)
    if not sequence_wise:
        scores = logits.float().softmax(-1)
        n = m.sum().clamp(min=1)
        f = num / (k * n) * (hits * m).sum(0)
        return (f * (scores * m).sum(0) / n).sum()
    scores = logits.float().sigmoid()
    scores = scores / scores.sum(-1, keepdim=True)
    hits, scores, m = (t.view(batch, -1, t.shape[-1]) for t in (hits, scores, m))
    n = m.sum(1).clamp(min=1)
    f = num / (k * n) * (hits * m).sum(1)
    return (f * (scores * m).sum(1) / n).sum(-1).mean()


class BalanceLoss:
    """Collects router outputs during a training forward and turns them into the balance loss."""

    def __init__(self, model: nn.Module, alpha: float, sequence_wise: bool) -> None:
        self.alpha, self.sequence_wise = alpha, sequence_wise
        self.records: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.active = False
        self.mask: torch.Tensor | None = None
        self.batch = 1
        self.handles = [r.register_forward_hook(self._hook) for r in routers(model).values()]

    def _hook(self, module: nn.Module, args: tuple, output: tuple) -> None:
        if self.active:  # not during the recomputation of activation checkpointing
            logits, _, index = output
            self.records.append((logits, index))
            self.batch = args[0].shape[0] if args[0].dim() == 3 else 1

    def start(self, attention_mask: torch.Tensor | None) -> None:
        self.records, self.active, self.mask = [], True, attention_mask

    def finish(self) -> torch.Tensor:
        self.active = False
        total = torch.zeros(())
        for logits, index in self.records:
            mask = self.mask.reshape(-1).to(logits.device) if self.mask is not None else torch.ones(
                logits.shape[0], device=logits.device)
            total = total.to(logits.device) + balance_term(logits, index, mask, self.batch, self.sequence_wise)
        self.records = []
        return self.alpha * total


def for_model(model: nn.Module, alpha: float | None) -> BalanceLoss:
    config = model.config
    default = getattr(config, "aux_loss_alpha", None) or getattr(config, "router_aux_loss_coef", None) or 0.001
    alpha = alpha if alpha is not None else float(default)
    return BalanceLoss(model, alpha, sequence_wise=config.model_type == "deepseek_v3")
