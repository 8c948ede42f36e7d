"""The reference recipe's algorithm in plain PyTorch, written for clarity, not speed.

Everything here is computed in float64 from the row-normalised
log-probabilities. Given the uniforms a kernel drew
(:func:`pgest.philox.uniforms`), the reference samples the very same actions
(up to float rounding where a uniform lands on a boundary between two actions),
so kernels are checked exactly, not only statistically.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from .reinforce_grad import ReinforceGrad


def sample_inverse_cdf(log_probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """The action of uniform u in each row: the first column whose cumulative
    probability exceeds u. Columns of zero probability can never be chosen."""
    probs = torch.softmax(log_probs.double(), dim=-1)
    cdf = probs.cumsum(-1)
    # u * total rather than u: the kernel compares against unnormalised mass.
    actions = torch.searchsorted(cdf, uniforms.double() * cdf[:, -1:], right=True)
    return actions.clamp_max(log_probs.shape[-1] - 1)


def rewards_of(actions: torch.Tensor, labels=None, reward_table=None) -> torch.Tensor:
    """Rewards of (B, S) actions: 1.0 for the label, else 0.0; or table lookups."""
    if labels is not None:
        return (actions == labels.view(-1, 1)).double()
    table = reward_table.double()
    if table.dim() == 1:
        return table[actions]
    return table.gather(1, actions)


def baseline_values(rewards: torch.Tensor, baseline) -> torch.Tensor:
    """The baseline of every (row, sample), broadcastable to rewards (B, S)."""
    if baseline is None:
        return torch.zeros_like(rewards)
    if isinstance(baseline, str):
        if baseline == "mean":
            return rewards.mean().expand_as(rewards)
        if baseline == "rloo":
            S = rewards.shape[1]
            return (rewards.sum(1, keepdim=True) - rewards) / (S - 1)
        raise ValueError(f"unknown baseline {baseline!r}")
    if isinstance(baseline, torch.Tensor):
        return baseline.detach().double().view(-1, 1).expand_as(rewards)
    return torch.full_like(rewards, float(baseline))


def reinforce_grad(
    log_probs: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    *,
    reward_table: Optional[torch.Tensor] = None,
    baseline: Union[None, float, str, torch.Tensor] = None,
    num_samples: int = 1,
    uniforms: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
) -> ReinforceGrad:
    """Reference for :func:`pgest.reinforce_grad`. With ``uniforms`` (B, S)
    it samples by inverse CDF; without, by ``torch.multinomial`` like the reference recipe."""
    B, K = log_probs.shape
    lp = log_probs.detach()
    if uniforms is None:
        probs = torch.softmax(lp.double(), dim=-1)
        actions = torch.multinomial(probs, num_samples, replacement=True, generator=generator)
    else:
        actions = sample_inverse_cdf(lp, uniforms.view(B, num_samples))
    rewards = rewards_of(actions, labels, reward_table)
    b = baseline_values(rewards, baseline)
    # The reference recipe's step 3: (baseline - reward) / batch_size at the sampled action,
    # summed over samples (scatter_add: two samples may pick the same action).
    coef = (b - rewards) / (B * num_samples)
    grad = torch.zeros((B, K), dtype=torch.float64, device=log_probs.device).scatter_add_(1, actions, coef)
    grad = grad.to(log_probs.dtype)
    if num_samples == 1:
        actions, rewards = actions.view(B), rewards.view(B)
    return ReinforceGrad(actions, rewards.float(), grad)


def recipe_step(log_probs: torch.Tensor, labels: torch.Tensor, baseline: torch.Tensor,
                generator: Optional[torch.Generator] = None):
    """The reference recipe: the four-step PyTorch listing pgest.reinforce_grad
    replaces (the project's source document), steps 1-3 as written there:
    multinomial sampling of exp(log_probs), label reward, one-hot gradient
    (baseline - reward) / B. Returns (actions, rewards, one_hot_gradients),
    the gradient in the dtype of ``log_probs`` (the sampling in float32 for
    16-bit inputs, which multinomial does not take)."""
    batch_size, n_classes = log_probs.shape
    with torch.no_grad():
        actions = torch.multinomial(torch.exp(log_probs.float()), 1, generator=generator).view(-1)
        rewards = (actions == labels).float()
        gradients = (baseline - rewards) / batch_size
        one_hot_gradients = gradients[:, None] * torch.nn.functional.one_hot(actions, n_classes)
    return actions, rewards, one_hot_gradients.to(log_probs.dtype)


seed_step = recipe_step  # the name it had before "seed" meant only random seeds
