"""pgest.reinforce_grad: the reference recipe's policy-gradient step, fused.

Samples actions from each row of log-probabilities, rewards them, subtracts a
baseline and returns the one-hot score gradient that ``log_probs.backward``
takes, in one pass over the rows with no (B, K) temporary besides the
gradient itself.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch

from . import _checks
from ._checks import check_num_samples
from ._rewards import resolve_baseline
from .ops.log_prob import traced
from .ops.reinforce_grad import check_call, reinforce_grad_op, run_kernel
from .philox import next_seed_offset, seed_tensor


class ReinforceGrad(NamedTuple):
    actions: torch.Tensor  # int64 (B,) or (B, S)
    rewards: torch.Tensor  # float32, same shape
    grad: torch.Tensor     # (B, K), dtype of log_probs


def reinforce_grad(
    log_probs: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    *,
    reward_table: Optional[torch.Tensor] = None,
    baseline: Union[None, float, str, torch.Tensor] = None,
    num_samples: int = 1,
    generator: Optional[torch.Generator] = None,
) -> ReinforceGrad:
    """Sample, reward, subtract a baseline and build the one-hot score gradient.

    Args:
        log_probs: (B, K) float32/float64/float16/bfloat16 log-probabilities
            (``torch.log_softmax(logits, -1)``), any strides. Sampling
            normalises each row (fp32 accumulation for 16-bit inputs, fp64 for
            fp64), but the returned ``grad`` is the gradient with respect to
            *log-probabilities*: backpropagated into unnormalised logits it is
            wrong (the softmax term is missing). A warning is issued once when
            rows are not normalised; use :func:`pgest.reinforce` to work on
            logits.
        labels: (B,) integer labels; reward 1.0 where the action equals the
            label, else 0.0 (the reference recipe's "guess the label" reward).
        reward_table: instead of labels, a (B, K) or (K,) float table; the
            reward of action a in row i is ``reward_table[i, a]``.
        baseline: None (0), a float, a (B,) tensor (a value head's output, used
            but never differentiated), ``"mean"`` (mean reward of the batch,
            each sample's own reward included: a bias of order 1 / (B * S)) or
            ``"rloo"`` (mean of the other ``num_samples - 1`` rewards of the
            row: unbiased).
        num_samples: S >= 1 independent draws per row.
        generator: a ``torch.Generator`` of the input's device; default: torch's
            default generator of that device.

    Returns:
        ``ReinforceGrad(actions, rewards, grad)``: int64 actions and float32
        rewards of shape (B,) when S == 1, else (B, S); ``grad`` (B, K) in the
        dtype of ``log_probs`` holding ``sum_s (b_is - r_is) / (B * S)`` at each
        sampled action and 0 elsewhere. ``log_probs.backward(grad)`` is then the
        reference recipe's step 4.

    Under ``torch.compile`` (``fullgraph=True`` included) and on CUDA the call
    goes through the registered op ``pgest::reinforce_grad``, which checks its
    arguments itself.
    """
    S = check_num_samples(num_samples)
    _checks.check_float_tensor(log_probs, "log_probs")
    if log_probs.dim() != 2:
        raise ValueError(f"log_probs must be 2-D (B, K), got shape {tuple(log_probs.shape)}")
    kind, constant, baseline_t = resolve_baseline(baseline, log_probs.shape[0], S, log_probs.device)
    if traced() or log_probs.device.type != "cpu":
        actions, rewards, grad = reinforce_grad_op(log_probs, labels, reward_table, kind, constant, baseline_t, S,
                                                     seed_tensor(generator, log_probs.device))
    else:
        # Eager CPU: the kernel directly (no torch.library dispatch), after the op's own checks.
        labels, reward_table, baseline_t = check_call(log_probs, labels, reward_table, kind, constant, baseline_t, S)
        # one draw from the generator per call, an empty batch included (every sampling op's rule)
        seed = next_seed_offset(generator, log_probs.device, S)[0]
        actions, rewards, grad = run_kernel(log_probs.detach(), labels, reward_table, kind, constant, baseline_t, S,
                                             seed)
    if S == 1:
        actions, rewards = actions.view(-1), rewards.view(-1)
    return ReinforceGrad(actions, rewards, grad)
