"""Rewards and baselines of the REINFORCE ops: their argument checks and the
resolution of a baseline argument, shared by reinforce_grad and reinforce."""
from __future__ import annotations

import numbers

import torch

from . import _checks

FLOAT32_MAX = float(torch.finfo(torch.float32).max)

BASELINE_NAMES = ("mean", "rloo")
BASELINE_KINDS = {"none": 0, "constant": 1, "tensor": 2, "mean": 3, "rloo": 4}


def _check_labels(labels, rows: int, cols: int, device: torch.device, ref: str = "log_probs") -> torch.Tensor:
    _checks.check_tensor(labels, "labels", "a torch.Tensor of integers")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if labels.dim() != 1 or labels.shape[0] != rows:
        raise ValueError(f"labels must have shape ({rows},) to match {ref}, got {tuple(labels.shape)}")
    _checks.check_device(labels, "labels", device, ref)
    return _checks.as_int64(labels.detach(), "labels", cols)


def _check_reward_table(table, rows: int, cols: int, device: torch.device, ref: str = "log_probs") -> torch.Tensor:
    _checks.check_float_tensor(table, "reward_table")
    if tuple(table.shape) not in ((rows, cols), (cols,)):
        raise ValueError(
            f"reward_table must have shape ({rows}, {cols}) or ({cols},) to match {ref}, "
            f"got {tuple(table.shape)}"
        )
    _checks.check_device(table, "reward_table", device, ref)
    return table.detach()


def _check_baseline_value(value: float) -> float:
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"baseline must be finite, got {value}")
    if abs(value) > FLOAT32_MAX:
        raise ValueError(f"baseline {value} overflows float32, the type rewards are kept in")
    return value


def _check_baseline_tensor(baseline, rows: int, device: torch.device, ref: str = "log_probs") -> torch.Tensor:
    _checks.check_float_tensor(baseline, "baseline")
    if baseline.dim() != 1 or baseline.shape[0] != rows:
        raise ValueError(f"baseline tensor must have shape ({rows},), one value per row, got {tuple(baseline.shape)}")
    _checks.check_device(baseline, "baseline", device, ref)
    # A learned value head: used as a constant, never differentiated through.
    return baseline.detach()



def resolve_baseline(baseline, rows: int, num_samples: int, device: torch.device):
    """-> (kind, constant, tensor or None)."""
    if baseline is None:
        return BASELINE_KINDS["none"], 0.0, None
    if isinstance(baseline, str):
        if baseline not in BASELINE_NAMES:
            raise ValueError(f"baseline must be None, a float, a (B,) tensor, 'mean' or 'rloo'; got {baseline!r}")
        if baseline == "rloo" and num_samples < 2:
            raise ValueError("baseline='rloo' (leave-one-out) needs num_samples >= 2")
        return BASELINE_KINDS[baseline], 0.0, None
    if isinstance(baseline, bool):
        raise TypeError("baseline must be None, a float, a (B,) tensor, 'mean' or 'rloo'; got a bool")
    if isinstance(baseline, numbers.Real):
        return BASELINE_KINDS["constant"], _check_baseline_value(float(baseline)), None
    if isinstance(baseline, torch.Tensor):
        return BASELINE_KINDS["tensor"], 0.0, _check_baseline_tensor(baseline, rows, device)
    raise TypeError(
        f"baseline must be None, a float, a (B,) tensor, 'mean' or 'rloo'; got {type(baseline).__name__}"
    )


def check_reward_args(labels, reward_table, kind: int, constant: float, baseline, rows: int, cols: int,
                      num_samples: int, device: torch.device, ref: str = "log_probs"):
    """The rewards' and the baseline's arguments of (rows, cols) logits with
    num_samples draws a row, checked alike on every route that takes them
    (pgest::reinforce_grad, pgest::reinforce_weights: the registered ops are
    public) -> the labels as int64, the detached table and baseline."""
    if (labels is None) == (reward_table is None):
        raise ValueError("pass exactly one of labels and reward_table")
    if labels is not None:
        labels = _check_labels(labels, rows, cols, device, ref)
    else:
        reward_table = _check_reward_table(reward_table, rows, cols, device, ref)
    if kind not in BASELINE_KINDS.values():
        raise ValueError(f"baseline_kind must be one of 0-4 ({', '.join(BASELINE_KINDS)}), got {kind}")
    if kind == BASELINE_KINDS["rloo"] and num_samples < 2:
        raise ValueError("baseline='rloo' (leave-one-out) needs num_samples >= 2")
    if kind == BASELINE_KINDS["constant"]:
        _check_baseline_value(float(constant))
    if (baseline is not None) != (kind == BASELINE_KINDS["tensor"]):
        raise ValueError("a baseline tensor goes with baseline_kind 2 (tensor), and baseline_kind 2 needs one")
    if baseline is not None:
        baseline = _check_baseline_tensor(baseline, rows, device, ref)
    return labels, reward_table, baseline
