"""pgest.policy_loss: -advantage * log softmax(logits)[action] per row, an
autograd op whose forward reads the logits once and whose backward reads them
once and writes the gradient once. It saves the logits (no copy) and O(rows)
statistics, never a softmax.

A thin user of pgest.log_prob's kernels (csrc/include/pgest/log_prob.h): the
forward is log_prob's with the weighted sum fused in, the backward is
log_prob's with g_s = -grad_loss * advantage_s and g_H = -grad_loss * beta.
Registered as ``pgest::policy_loss`` and ``pgest::policy_loss_backward`` for
torch.compile; eager calls go to the native code directly.
"""
from __future__ import annotations

from torch import Tensor

from . import _checks, _status
from ._checks import (
    actions_per_row,
    check_entropy_weight,
    check_ignore_index,
    check_logits,
    index_tensor,
)
from .ops.log_prob import (
    rows_of,
)
from .ops.policy_loss import REDUCTIONS, loss_rows


def policy_loss(
    logits: Tensor,
    actions: Tensor,
    advantages: Tensor,
    *,
    entropy_weight: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> Tensor:
    """Policy-gradient surrogate loss: ``-advantage * log softmax(logits)[action]``
    per row, plus ``entropy_weight * sum(p log p)`` (the reference recipe's regulariser),
    reduced like :func:`torch.nn.functional.cross_entropy`.

    With advantages all 1 and actions = labels this is cross entropy, gradient
    included: policy gradient is cross entropy weighted by reward.

    Args:
        logits: (..., K) float32/float64/float16/bfloat16; leading dims are rows.
        actions: (...,) integer actions, or (..., S) for S samples of each row
            (several completions per prompt); entries equal to ``ignore_index``
            count for nothing, and a row with nothing left has no loss, no
            entropy term and a zero gradient.
        advantages: floats of the shape of ``actions``, treated as constants
            (never differentiated).
        reduction: ``"mean"`` (over the actions not ignored), ``"sum"`` or
            ``"none"`` (one loss per row, its samples summed).

    The loss is float32 for 16-bit logits (float64 for float64): the per-row
    statistics are accumulated in that type.
    """
    check_logits(logits)
    lead = logits.shape[:-1]
    S = actions_per_row(logits, actions)
    _checks.check_float_tensor(advantages, "advantages")
    if advantages.shape != actions.shape:
        raise ValueError(f"advantages must have shape {tuple(actions.shape)} like actions, "
                         f"got {tuple(advantages.shape)}")
    _checks.check_device(actions, "actions", logits, "logits")
    _checks.check_device(advantages, "advantages", logits, "logits")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    beta = check_entropy_weight(entropy_weight)
    ii = check_ignore_index(ignore_index)

    acc = _checks.stats_dtype(logits.dtype)
    a2 = index_tensor(actions, logits.shape[-1]).reshape(-1, S)
    w2 = advantages.detach().reshape(-1, S)
    if w2.dtype != acc or not w2.is_contiguous():
        w2 = w2.to(acc).contiguous()
    try:
        loss = loss_rows(rows_of(logits), a2, w2, beta, ii, reduction=reduction)
    except (ValueError, IndexError) as e:
        raise type(e)(_status.unflatten_message(str(e), lead)) from None
    return loss.view(tuple(lead)) if reduction == "none" else loss
