"""Baselines and advantage normalisation for training loops.

All functions take rewards of shape (B, S): S samples (a group) per prompt or
state. They return advantages of the same shape; none of them is
differentiated through (rewards carry no gradient).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor


def _check_grouped(rewards, name: str = "rewards", min_samples: int = 1) -> None:
    if not isinstance(rewards, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(rewards).__name__}")
    if not rewards.dtype.is_floating_point:
        raise TypeError(f"{name} must be a float tensor, got {rewards.dtype}")
    if rewards.dim() != 2:
        raise ValueError(f"{name} must be 2-D (B, S): S samples per group, got shape {tuple(rewards.shape)}")
    if rewards.shape[1] < min_samples:
        raise ValueError(f"{name} needs at least {min_samples} samples per group, got S = {rewards.shape[1]}")


def leave_one_out(rewards: Tensor) -> Tensor:
    """RLOO advantages: r_is - mean of the other S - 1 rewards of group i."""
    _check_grouped(rewards, min_samples=2)
    S = rewards.shape[1]
    return rewards - (rewards.sum(1, keepdim=True) - rewards) / (S - 1)


def group_normalize(rewards: Tensor, eps: float = 1e-6) -> Tensor:
    """GRPO advantages: (r - group mean) / (group std + eps), std with Bessel's
    correction (torch's default). A group whose rewards are all equal gets 0."""
    _check_grouped(rewards, min_samples=2)
    mean = rewards.mean(1, keepdim=True)
    std = rewards.std(1, keepdim=True)
    return (rewards - mean) / (std + eps)


def normalize(advantages: Tensor, eps: float = 1e-8, *, process_group=None) -> Tensor:
    """Batch normalisation of advantages: zero mean and unit variance over all
    entries (the usual PPO/A2C step). ``process_group`` (data parallel): the
    mean and the standard deviation are those of every rank's entries
    together (one all_reduce of three numbers), as one process holding the
    whole batch computes them."""
    if not isinstance(advantages, Tensor) or not advantages.dtype.is_floating_point:
        raise TypeError("advantages must be a float torch.Tensor")
    if process_group is not None:
        mean, std = _global_moments(advantages.detach(), process_group)
        return (advantages - mean.to(advantages.dtype)) / (std.to(advantages.dtype) + eps)
    if advantages.numel() < 2:
        return advantages - advantages.mean() if advantages.numel() else advantages
    return (advantages - advantages.mean()) / (advantages.std() + eps)


def _global_moments(x: Tensor, group) -> Tuple[Tensor, Tensor]:
    """Mean and Bessel-corrected std of the entries of every rank's x."""
    import torch.distributed as dist

    x64 = x.double()
    n = torch.full((), float(x.numel()), dtype=torch.float64, device=x.device)  # no host-to-device copy
    total = torch.stack([n, x64.sum()])
    dist.all_reduce(total, group=group)
    mean = total[1] / total[0].clamp_min(1)
    ss = ((x64 - mean) ** 2).sum()
    dist.all_reduce(ss, group=group)
    # fewer than two entries in the whole group: std 0 (the entries become
    # x - mean = 0, as one process gives), not 0 / 0
    return mean, torch.where(total[0] > 1, ss / (total[0] - 1).clamp_min(1), torch.zeros_like(ss)).sqrt()


class MovingAverageBaseline:
    """Exponential moving average of the mean reward: ``b <- decay * b +
    (1 - decay) * mean(rewards)``. Use :attr:`value` as the baseline of a
    batch, then :meth:`update` with that batch's rewards, so a batch's reward
    never enters its own baseline (which would bias the estimate)."""

    def __init__(self, decay: float = 0.99, initial: Optional[float] = None, *, process_group=None) -> None:
        if not 0.0 <= float(decay) < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self._value = None if initial is None else float(initial)
        # data parallel: each update folds in the mean over every rank's rewards
        self._group = process_group

    @property
    def value(self) -> float:
        """The current baseline (0.0 before the first update)."""
        return 0.0 if self._value is None else self._value

    def update(self, rewards: Tensor) -> float:
        """Fold a batch's mean reward in; returns the new value. The first
        update sets the value to that mean."""
        if not isinstance(rewards, Tensor):
            raise TypeError(f"rewards must be a torch.Tensor, got {type(rewards).__name__}")
        if self._group is not None:
            import torch.distributed as dist

            # a rank with no rewards still joins the collective (legal: the
            # union is what counts); no reward anywhere fails on every rank
            t = torch.stack([rewards.detach().double().sum(),
                             torch.full((), float(rewards.numel()), dtype=torch.float64, device=rewards.device)])
            dist.all_reduce(t, group=self._group)
            if t[1] == 0:
                raise ValueError("rewards: no rewards on any rank of the process group")
            m = float(t[0] / t[1])
        elif rewards.numel() == 0:
            raise ValueError("rewards must be a non-empty torch.Tensor (no rewards to average)")
        else:
            m = float(rewards.detach().double().mean())
        self._value = m if self._value is None else self.decay * self._value + (1 - self.decay) * m
        return self._value

    def __repr__(self) -> str:
        return f"MovingAverageBaseline(decay={self.decay}, value={self.value:.6g})"
