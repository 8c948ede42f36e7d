"""pgest.reinforce: sample, reward, baseline and the REINFORCE surrogate loss
on logits, fused: the forward reads the logits once (pgest::sample gives the
log-sum-exp and entropy that the loss needs), the backward reads them once and
writes the gradient once.

The loss is  mean_i [ sum_s (b_is - r_is) / S * log p(a_is) ] - entropy_weight * mean_i H_i,
whose gradient w.r.t. the logits is the mean over rows and samples of
(b - r)(onehot(a) - softmax) plus the entropy term: what the seed's steps 1-4
produce through log_softmax.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor

from . import _native as nat
from .philox import seed_tensor
from .policy_loss import check_entropy_weight, policy_loss_rows
from .reinforce_grad import _resolve_baseline
from .sample import _unflatten_message, check_logits, check_num_samples, rows_of, sample_rows


class Reinforce(NamedTuple):
    loss: Tensor      # scalar surrogate; loss.backward() gives the policy gradient
    actions: Tensor   # int64 (...,) or (..., S)
    rewards: Tensor   # same shape, accumulation dtype
    log_prob: Tensor  # log p(action), same shape (no grad)
    entropy: Tensor   # (...,) per-row entropy (no grad)


def _rewards(actions: Tensor, labels, reward_table, lead, K, acc) -> Tensor:
    R, S = actions.shape
    if labels is not None:
        if not isinstance(labels, Tensor):
            raise TypeError(f"labels must be a torch.Tensor of integers, got {type(labels).__name__}")
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
        if labels.shape != lead:
            raise ValueError(f"labels must have shape {tuple(lead)} to match logits, got {tuple(labels.shape)}")
        flat = labels.reshape(-1, 1).to(torch.int64)
        bad = ((flat < 0) | (flat >= K)).nonzero()
        if bad.numel():
            row = int(bad[0, 0])
            raise IndexError(f"labels[{nat.row_index(row, lead)}] = {int(flat[row])} is out of range for {K} actions")
        return (actions == flat).to(acc)
    nat.check_float_tensor(reward_table, "reward_table")
    table = reward_table.detach()
    if table.shape == (K,):
        r = table.to(acc)[actions]
    elif table.shape == tuple(lead) + (K,):
        r = table.reshape(R, K).to(acc).gather(1, actions)
    else:
        raise ValueError(f"reward_table must have shape {tuple(lead) + (K,)} or ({K},), got {tuple(table.shape)}")
    bad = (~torch.isfinite(r)).nonzero()
    if bad.numel():
        row, s = int(bad[0, 0]), int(bad[0, 1])
        where = f"{int(actions[row, s])}" if table.dim() == 1 else f"{nat.row_index(row, lead)}, {int(actions[row, s])}"
        raise ValueError(f"reward_table[{where}] is {float(r[row, s])} (sampled in row {row}): rewards must be finite")
    return r


def _baseline_values(kind, constant, tensor, rewards: Tensor) -> Tensor:
    if kind == 0:
        return torch.zeros_like(rewards)
    if kind == 1:
        return torch.full_like(rewards, constant)
    if kind == 2:
        b = tensor.reshape(-1, 1).to(rewards.dtype)
        if not torch.isfinite(b).all():
            row = int((~torch.isfinite(b)).nonzero()[0, 0])
            raise ValueError(f"baseline[{row}] is {float(b[row])}: baselines must be finite")
        return b.expand_as(rewards)
    if kind == 3:
        return rewards.mean().expand_as(rewards)
    S = rewards.shape[1]
    return (rewards.sum(1, keepdim=True) - rewards) / (S - 1)


def reinforce(
    logits: Tensor,
    labels: Optional[Tensor] = None,
    *,
    reward_table: Optional[Tensor] = None,
    baseline: Union[None, float, str, Tensor] = None,
    num_samples: int = 1,
    entropy_weight: float = 0.0,
    generator: Optional[torch.Generator] = None,
) -> Reinforce:
    """REINFORCE on logits: sample, reward, subtract a baseline, and return a
    surrogate loss whose ``backward()`` is the baseline-corrected policy gradient.

    Args mirror :func:`pgest.reinforce_grad`, on (..., K) logits: ``labels``
    (...,) or ``reward_table`` (..., K) / (K,); ``baseline`` None, a float, a
    (...,) tensor (not differentiated), ``"mean"`` or ``"rloo"``;
    ``entropy_weight`` adds ``entropy_weight * sum(p log p)`` averaged over rows
    (the seed's regulariser).
    """
    check_logits(logits)
    S = check_num_samples(num_samples)
    beta = check_entropy_weight(entropy_weight)
    if (labels is None) == (reward_table is None):
        raise ValueError("pass exactly one of labels and reward_table")
    lead, K = logits.shape[:-1], logits.shape[-1]
    R = lead.numel()
    kind, constant, b_tensor = _resolve_baseline(baseline, R, S, logits.device)
    if b_tensor is not None and b_tensor.shape != (R,):
        raise ValueError(f"baseline tensor must have shape {tuple(lead)}, got {tuple(b_tensor.shape)}")
    for t, name in ((labels, "labels"), (reward_table, "reward_table")):
        if isinstance(t, Tensor):
            nat.check_device(t, name, logits.device, "logits")
    acc = nat.stats_dtype(logits.dtype)
    x = rows_of(logits)

    seed = seed_tensor(generator, logits.device)
    try:
        actions, log_prob, entropy, lse = sample_rows(x.detach(), S, seed)
    except ValueError as e:
        raise ValueError(_unflatten_message(str(e), lead)) from None
    rewards = _rewards(actions, labels, reward_table, lead, K, acc)
    b = _baseline_values(kind, constant, b_tensor, rewards)
    weights = (rewards - b) / S
    stats = torch.stack([lse, entropy], 1)
    # Sampled actions are never negative, so -1 ignores nothing.
    loss_rows, _, _ = policy_loss_rows(x, actions, weights, beta, -1, stats)
    loss = loss_rows.mean() if R else loss_rows.sum()
    shape = tuple(lead) if S == 1 else tuple(lead) + (S,)
    return Reinforce(loss, actions.view(shape), rewards.view(shape), log_prob.view(shape), entropy.view(tuple(lead)))
