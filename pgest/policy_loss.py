"""pgest.policy_loss: -advantage * log softmax(logits)[action] per row, an
autograd op whose forward reads the logits once and whose backward reads them
once and writes the gradient once. It saves the logits (no copy) and O(rows)
statistics, never a softmax.

Registered as the torch ops ``pgest::policy_loss`` and
``pgest::policy_loss_backward``; :func:`pgest.reinforce` uses the same pair.
"""
from __future__ import annotations

import numbers
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _C
from . import _native as nat
from .sample import check_logits, rows_of

REDUCTIONS = ("mean", "sum", "none")


def _loss_args(logits, actions, weights, entropy_weight, ignore_index) -> "_C.PolicyLossArgs":
    a = _C.PolicyLossArgs()
    a.logits = logits.data_ptr()
    a.dtype = nat.DTYPE_CODES[logits.dtype]
    a.rows, a.cols = logits.shape
    a.row_stride, a.col_stride = logits.stride()
    a.actions = actions.data_ptr()
    a.num_samples = actions.shape[1]
    a.ignore_index = ignore_index
    a.weights = weights.data_ptr()
    a.entropy_weight = entropy_weight
    a.num_threads = nat.num_threads()
    return a


@torch.library.custom_op("pgest::policy_loss", mutates_args=())
def policy_loss_rows(logits: Tensor, actions: Tensor, weights: Tensor, entropy_weight: float,
                     ignore_index: int, stats: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    """Per-row loss -sum_s w_s log p(a_s) - entropy_weight * H for (R, K) logits,
    (R, S) int64 actions and (R, S) weights in the accumulation dtype.
    Returns (loss, lse, entropy), each (R,). With ``stats`` = (R, 2) [lse,
    entropy] from ``pgest::sample`` the logits are not read again."""
    R = logits.shape[0]
    acc = nat.stats_dtype(logits.dtype)
    actions, weights = actions.contiguous(), weights.contiguous()
    dev = logits.device
    loss = torch.empty((R,), dtype=acc, device=dev)
    if stats is not None:
        # fresh tensors: a custom op's outputs may not alias its inputs
        lse = stats[:, 0].clone(memory_format=torch.contiguous_format)
        entropy = stats[:, 1].clone(memory_format=torch.contiguous_format)
    else:
        lse, entropy = torch.empty((R,), dtype=acc, device=dev), torch.empty((R,), dtype=acc, device=dev)
    if R:
        a = _loss_args(logits, actions, weights, entropy_weight, ignore_index)
        a.loss, a.lse, a.entropy = loss.data_ptr(), lse.data_ptr(), entropy.data_ptr()
        a.stats_given = stats is not None
        res = (nat.cuda_call("policy_loss_forward", a, dev, values=logits, actions=actions) if dev.type == "cuda"
               else _C.policy_loss_forward_cpu(a))
        nat.raise_for_status(res, input_name="logits", num_actions=logits.shape[1],
                             samples_per_row=actions.shape[1], ignore_index=ignore_index)
    return loss, lse, entropy


@policy_loss_rows.register_fake
def _(logits, actions, weights, entropy_weight, ignore_index, stats):
    R = logits.shape[0]
    acc = nat.stats_dtype(logits.dtype)
    return tuple(logits.new_empty((R,), dtype=acc) for _ in range(3))


@torch.library.custom_op("pgest::policy_loss_backward", mutates_args=())
def policy_loss_backward(grad_loss: Tensor, logits: Tensor, actions: Tensor, weights: Tensor, lse: Tensor,
                         entropy: Tensor, entropy_weight: float, ignore_index: int) -> Tensor:
    """d loss / d logits for upstream (R,) grad_loss: one read of the logits,
    every gradient entry written once (no zero-fill)."""
    R, K = logits.shape
    grad = torch.empty((R, K), dtype=logits.dtype, device=logits.device)
    if R:
        acc = nat.stats_dtype(logits.dtype)
        actions, weights = actions.contiguous(), weights.contiguous()
        grad_loss, lse, entropy = (t.to(acc).contiguous() for t in (grad_loss, lse, entropy))
        a = _loss_args(logits, actions, weights, entropy_weight, ignore_index)
        a.lse, a.entropy, a.grad_loss, a.grad = lse.data_ptr(), entropy.data_ptr(), grad_loss.data_ptr(), grad.data_ptr()
        res = (nat.cuda_call("policy_loss_backward", a, logits.device) if logits.is_cuda
               else _C.policy_loss_backward_cpu(a))
        nat.raise_for_status(res, input_name="logits", num_actions=K)
    return grad


@policy_loss_backward.register_fake
def _(grad_loss, logits, actions, weights, lse, entropy, entropy_weight, ignore_index):
    return logits.new_empty(tuple(logits.shape))


def _setup_context(ctx, inputs, output):
    logits, actions, weights, entropy_weight, ignore_index, _ = inputs
    _, lse, entropy = output
    ctx.save_for_backward(logits, actions, weights, lse, entropy)
    ctx.entropy_weight, ctx.ignore_index = entropy_weight, ignore_index
    ctx.mark_non_differentiable(lse, entropy)


def _backward(ctx, grad_loss, _grad_lse, _grad_entropy):
    logits, actions, weights, lse, entropy = ctx.saved_tensors
    grad = policy_loss_backward(grad_loss, logits, actions, weights, lse, entropy,
                                ctx.entropy_weight, ctx.ignore_index)
    return grad, None, None, None, None, None


policy_loss_rows.register_autograd(_backward, setup_context=_setup_context)


def check_entropy_weight(entropy_weight) -> float:
    if isinstance(entropy_weight, bool) or not isinstance(entropy_weight, numbers.Real):
        raise TypeError(f"entropy_weight must be a float, got {type(entropy_weight).__name__}")
    value = float(entropy_weight)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"entropy_weight must be finite, got {value}")
    return value


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
    per row, plus ``entropy_weight * sum(p log p)`` (the seed's regulariser),
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
    if not isinstance(actions, Tensor):
        raise TypeError(f"actions must be a torch.Tensor of integers, got {type(actions).__name__}")
    if actions.dtype.is_floating_point or actions.dtype.is_complex or actions.dtype == torch.bool:
        raise TypeError(f"actions must be an integer tensor, got {actions.dtype}")
    if actions.shape == lead:
        S = 1
    elif actions.dim() == len(lead) + 1 and actions.shape[:-1] == lead:
        S = actions.shape[-1]
    else:
        raise ValueError(f"actions must have shape {tuple(lead)} (or {tuple(lead)} + (S,)) to match logits "
                         f"{tuple(logits.shape)}, got {tuple(actions.shape)}")
    nat.check_float_tensor(advantages, "advantages")
    if advantages.shape != actions.shape:
        raise ValueError(f"advantages must have shape {tuple(actions.shape)} like actions, "
                         f"got {tuple(advantages.shape)}")
    nat.check_device(actions, "actions", logits.device, "logits")
    nat.check_device(advantages, "advantages", logits.device, "logits")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    beta = check_entropy_weight(entropy_weight)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")

    acc = nat.stats_dtype(logits.dtype)
    a2 = actions.reshape(-1, S).to(torch.int64)
    w2 = advantages.detach().reshape(-1, S).to(acc)
    try:
        loss, _, _ = policy_loss_rows(rows_of(logits), a2, w2, beta, int(ignore_index), None)
    except (ValueError, IndexError) as e:
        raise type(e)(nat.unflatten_message(str(e), lead)) from None
    if reduction == "none":
        return loss.view(tuple(lead))
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / (a2 != ignore_index).sum()
