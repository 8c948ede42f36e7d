"""pgest.reinforce: sample, reward, baseline and the REINFORCE surrogate loss
on logits, fused: the forward reads the logits once (pgest::sample gives the
log-sum-exp and entropy that the loss needs), the backward reads them once and
writes the gradient once.

The loss is  mean_i [ sum_s (b_is - r_is) / S * log p(a_is) ] - entropy_weight * mean_i H_i,
whose gradient w.r.t. the logits is the mean over rows and samples of
(b - r)(onehot(a) - softmax) plus the entropy term: what the reference recipe's steps 1-4
produce through log_softmax.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor

from . import _checks, _status
from ._checks import check_entropy_weight, check_logits, check_num_samples
from ._rewards import resolve_baseline
from .ops.log_prob import rows_of
from .ops.policy_loss import loss_rows
from .ops.reinforce import reinforce_weights_op
from .ops.sample import draw_rows


class Reinforce(NamedTuple):
    loss: Tensor      # scalar surrogate; loss.backward() gives the policy gradient
    actions: Tensor   # int64 (...,) or (..., S)
    rewards: Tensor   # same shape, accumulation dtype
    log_prob: Tensor  # log p(action), same shape (no grad)
    entropy: Tensor   # (...,) per-row entropy (no grad)


def _check_labels(labels, lead) -> None:
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a torch.Tensor of integers, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if labels.shape != lead:
        raise ValueError(f"labels must have shape {tuple(lead)} to match logits, got {tuple(labels.shape)}")


def _check_table(table, lead, K) -> None:
    _checks.check_float_tensor(table, "reward_table")
    if table.shape != (K,) and table.shape != tuple(lead) + (K,):
        raise ValueError(f"reward_table must have shape {tuple(lead) + (K,)} or ({K},), got {tuple(table.shape)}")


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
    (the reference recipe's regulariser).

    Returns:
        ``Reinforce(loss, actions, rewards, log_prob, entropy)``:

        - ``loss``: scalar surrogate (mean over rows); ``loss.backward()``
          puts the baseline-corrected policy gradient (and the entropy term)
          into ``logits.grad``. The only differentiable output.
        - ``actions``: int64, shape (...,) when ``num_samples == 1``, else (..., S).
        - ``rewards``: the rewards of those actions, same shape, float32
          (float64 for float64 logits).
        - ``log_prob``: log softmax(logits) of the drawn actions, same shape,
          detached (what a PPO rollout stores as the old log-probabilities).
        - ``entropy``: (...,) entropy of each row, detached.
    """
    check_logits(logits)
    S = check_num_samples(num_samples)
    beta = check_entropy_weight(entropy_weight)
    if (labels is None) == (reward_table is None):
        raise ValueError("pass exactly one of labels and reward_table")
    lead, K = logits.shape[:-1], logits.shape[-1]
    R = lead.numel()
    if isinstance(baseline, Tensor):
        if baseline.shape != lead:
            raise ValueError(f"baseline tensor must have shape {tuple(lead)}, one value per row, "
                             f"got {tuple(baseline.shape)}")
        baseline = baseline.reshape(-1)
    kind, constant, b_tensor = resolve_baseline(baseline, R, S, logits.device)
    if labels is not None:
        _check_labels(labels, lead)
        _checks.check_device(labels, "labels", logits, "logits")
    else:
        _check_table(reward_table, lead, K)
        _checks.check_device(reward_table, "reward_table", logits, "logits")
        reward_table = reward_table.detach()
    acc = _checks.stats_dtype(logits.dtype)
    x = rows_of(logits)

    try:
        actions, log_prob, entropy, stats = draw_rows(x.detach(), S, generator)
    except ValueError as e:
        raise ValueError(_status.unflatten_message(str(e), lead)) from None
    rewards, weights = reinforce_weights_op(actions, labels, reward_table, kind, constant, b_tensor, K,
                                         list(lead), acc)
    # Nothing is ignored: not even the -1 of a row the GPU sampler refused
    # (deferred error), which must poison the loss, not drop out of it.
    # The mean over rows (each row's samples summed, their weights carry 1/S).
    loss = loss_rows(x, actions, weights, beta, -2**63, stats, entropy, reduction="mean" if R else "sum", divisor=R)
    shape = tuple(lead) if S == 1 else tuple(lead) + (S,)
    return Reinforce(loss, actions.view(shape), rewards.view(shape), log_prob.view(shape), entropy.view(tuple(lead)))
