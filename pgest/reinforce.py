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

import math
from typing import List, NamedTuple, Optional, Tuple, Union

import torch
from torch import Tensor

from . import _checks, _status, device_errors
from ._checks import check_entropy_weight, check_index_dtype, check_logits, check_num_samples
from ._rewards import check_reward_args, resolve_baseline
from .ops.log_prob import rows_of
from .ops.policy_loss import loss_rows
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


def _refuse_rows(t: Tensor, bad: Tensor, deferred: bool, words: list, status: int, col, error) -> Tensor:
    """Rows of t where bad (R, 1) holds: deferred, NaN in t with their first
    error word added to ``words``; else ``error(first row)`` is raised now."""
    if deferred:
        words.append(device_errors.first_error(bad, status, col))
        return t.masked_fill(bad, math.nan)
    hit = bad.nonzero()
    if hit.numel():
        raise error(int(hit[0, 0]))
    return t


@torch.library.custom_op("pgest::reinforce_weights", mutates_args=())
def reinforce_weights_op(actions: Tensor, labels: Optional[Tensor], reward_table: Optional[Tensor],
                      baseline_kind: int, baseline_value: float, baseline: Optional[Tensor],
                      num_actions: int, lead: List[int], dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    """(R, S) actions -> (rewards, weights = (rewards - baseline) / S) in
    ``dtype`` (the logits' accumulation type). Checks
    the values it reads (labels in range, rewards and baselines finite), and is
    a registered op so that these checks run under torch.compile too. O(R * S)."""
    check_index_dtype(actions, "actions")
    if actions.dim() != 2:
        raise ValueError(f"actions must be 2-D (rows, samples), got shape {tuple(actions.shape)}")
    R, S = actions.shape
    if num_actions < 1:
        raise ValueError(f"num_actions must be >= 1, got {num_actions}")
    if any(d < 0 for d in lead) or math.prod(lead) != R:
        raise ValueError(f"lead must be the leading shape of the {R} rows, got {list(lead)}")
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"dtype must be float32 or float64 (an accumulation type), got {dtype}")
    # the caller's shapes, (rows,) and (rows, K), for the checks reinforce_grad makes
    if labels is not None and isinstance(labels, Tensor) and labels.numel() == R:
        labels = labels.reshape(R)
    if reward_table is not None and isinstance(reward_table, Tensor) and reward_table.dim() > 1 \
            and reward_table.numel() == R * num_actions:
        reward_table = reward_table.reshape(R, num_actions)
    labels, reward_table, baseline = check_reward_args(labels, reward_table, baseline_kind, baseline_value, baseline,
                                                       R, num_actions, S, actions.device, "actions")
    # contiguous: the outputs follow the actions' layout, and the fake kernel
    # reports contiguous ones
    actions = _checks.as_int64(actions, "actions", num_actions).contiguous()
    acc = dtype
    # On the GPU the checks stay on the device by default (no read-back):
    # refused entries get NaN rewards and their first error word is deferred
    # (pgest.device_errors); else they are read here, with the values.
    deferred = device_errors.defers(actions)
    words = []
    if labels is not None:
        flat = labels.view(-1, 1)  # int64 (checked above)
        bad = (flat < 0) | (flat >= num_actions)
        rewards = _refuse_rows((actions == flat).to(acc), bad, deferred, words, _status.LABEL_OUT_OF_RANGE, flat,
                               lambda row: IndexError(f"labels[{_status.row_index(row, lead)}] = {int(flat[row])} is "
                                                      f"out of range for {num_actions} actions"))
    else:
        # the actions index the table: out-of-range ones are read clamped and
        # reported in the same pass (and host read) as a non-finite reward
        out = (actions < 0) | (actions >= num_actions)
        idx = actions.clamp(0, num_actions - 1)
        table = reward_table.to(acc)
        rewards = table[idx] if table.dim() == 1 else table.reshape(R, num_actions).gather(1, idx)
        bad = out | ~torch.isfinite(rewards)
        if deferred:
            samples = torch.arange(S, device=actions.device).expand(R, S)
            words.append(device_errors.first_error(
                bad, torch.where(out, _status.ACTION_OUT_OF_RANGE, _status.NONFINITE_REWARD),
                torch.where(out, samples, actions)))
            rewards = rewards.masked_fill(bad, math.nan)
        else:
            bad = bad.nonzero()
            if bad.numel():
                row, s = int(bad[0, 0]), int(bad[0, 1])
                col = int(actions[row, s])
                if bool(out[row, s]):
                    raise IndexError(f"actions[{row}, {s}] = {col} is out of range for {num_actions} actions")
                where = f"{col}" if table.dim() == 1 else f"{_status.row_index(row, lead)}, {col}"
                raise ValueError(f"reward_table[{where}] is {float(rewards[row, s])} (sampled in row {row}): "
                                 "rewards must be finite")
    if baseline_kind == 0:
        b = torch.zeros_like(rewards)
    elif baseline_kind == 1:
        b = torch.full_like(rewards, baseline_value)
    elif baseline_kind == 2:
        b = baseline.reshape(-1, 1).to(acc)
        b = _refuse_rows(b, ~torch.isfinite(b), deferred, words, _status.NONFINITE_BASELINE, 0,
                         lambda row: ValueError(f"baseline[{_status.row_index(row, lead)}] is {float(b[row])}: "
                                                "baselines must be finite")).expand_as(rewards)
    elif baseline_kind == 3:
        b = rewards.mean().expand_as(rewards)
    else:
        b = (rewards.sum(1, keepdim=True) - rewards) / (S - 1)
    if words:
        device_errors.defer_first(words, "pgest reinforce", dict(
            input_name="logits", num_actions=num_actions, samples_per_row=S, lead_shape=tuple(lead),
            table_is_vector=reward_table is not None and reward_table.dim() == 1))
    return rewards, (rewards - b) / S


@reinforce_weights_op.register_fake
def _(actions, labels, reward_table, baseline_kind, baseline_value, baseline, num_actions, lead, dtype):
    return actions.new_empty(actions.shape, dtype=dtype), actions.new_empty(actions.shape, dtype=dtype)


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
