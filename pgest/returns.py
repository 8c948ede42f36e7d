"""Rewards-to-go and generalised advantage estimation over time-major (T, B)
rollouts, as native reverse scans (registered as ``pgest::discounted_returns``
and ``pgest::gae``).

``dones[t]`` is True when the episode ended after ``rewards[t]``: nothing
flows back across it. ``last_value`` (B,) bootstraps a rollout cut off at T
(0 when None).
"""
from __future__ import annotations

from typing import Optional, Tuple

from torch import Tensor

from .ops.log_prob import traced
from .ops.returns import check_rate, gae_impl, gae_op, returns_impl, returns_op


def discounted_returns(rewards: Tensor, dones: Tensor, gamma: float,
                       last_value: Optional[Tensor] = None) -> Tensor:
    """Rewards-to-go G_t = r_t + gamma * (1 - done_t) * G_{t+1}, G_T = last_value.

    Args:
        rewards: (T, B) float32/float64, time-major.
        dones: (T, B) bool (or 0/1): the episode ended after rewards[t].
        gamma: discount in [0, 1]; with gamma = 1 and no dones this is the plain
            reward-to-go of the reference recipe.
        last_value: (B,) value of the state after the last step, for a rollout
            cut off mid-episode; 0 when None.

    Not differentiable: the inputs are used as constants (detached), so the
    result never requires grad.
    """
    # Eager: the op's body directly (its checks included), without torch.library's dispatch.
    op = returns_op if traced() else returns_impl
    return op(_detached(rewards), _detached(dones), check_rate(gamma, "gamma"), _detached(last_value))


def gae(rewards: Tensor, values: Tensor, dones: Tensor, gamma: float, lam: float,
        last_value: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al., 2016): returns
    ``(advantages, returns)``, each (T, B), with ``returns = advantages + values``.

    ``values`` (T, B) are V(s_t) from a value head, used as constants
    (detached: the advantages and returns never require grad, as PPO's
    targets must not); ``lam = 1`` gives the Monte-Carlo advantage
    (returns - values), ``lam = 0`` the one-step TD error. A NaN or inf after
    an episode end never reaches the steps before it.
    """
    op = gae_op if traced() else gae_impl
    return op(_detached(rewards), _detached(values), _detached(dones), check_rate(gamma, "gamma"),
              check_rate(lam, "lam"), _detached(last_value))


def _detached(t):
    return t.detach() if isinstance(t, Tensor) else t
