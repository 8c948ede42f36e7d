"""pgest::reinforce_weights, the registered op that turns pgest.reinforce's
draws into rewards and weights (reward checks, baselines) in torch ops, so
that the checks also run under torch.compile; the public function is in
pgest/reinforce.py (its sampling and loss run on the sample and policy_loss
kernels)."""
import math
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .. import _checks, _status, device_errors
from .._checks import check_index_dtype
from .._rewards import check_reward_args


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
