"""The policy_loss kernels' launch, their registration as torch ops (fake
kernels, autograd, vmap) and the eager fast path; the public functions are
in pgest/policy_loss.py."""
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _checks
from .._apply import fast_apply
from .._checks import (
    check_entropy_weight,
    check_rows,
    check_stats,
    check_weights,
    index_tensor,
)
from .._vmap import ROWS, STATS, register_rows
from .log_prob import (
    backward_rows,
    batched_upstream,
    creating_graph,
    forward_rows,
    functorch_active,
    grad_in_torch_ops,
    tangent_in_torch_ops,
    traced,
)

REDUCTIONS = ("mean", "sum", "none")


def weighted_log_probs(weights: Tensor, log_prob: Tensor) -> Tensor:
    """weights * log_prob, with w = 0 and log p = -inf (an impossible action)
    giving 0, as the native forward's fused loss (log_prob.h) counts it."""
    return torch.where(weights != 0, weights * log_prob, torch.zeros((), dtype=log_prob.dtype,
                                                                     device=log_prob.device))


@torch.library.custom_op("pgest::policy_loss", mutates_args=())
def policy_loss_op(logits: Tensor, actions: Tensor, weights: Tensor, entropy_weight: float,
                     ignore_index: int, stats: Optional[Tensor], entropy: Optional[Tensor]
                     ) -> Tuple[Tensor, Tensor, Tensor]:
    """Per-row loss -sum_s w_s log p(a_s) - entropy_weight * H for (R, K) logits,
    (R, S) int64 actions and (R, S) weights in the accumulation dtype.
    Returns (loss (R,), stats (2, R) = [row max, log Z], entropy (R,)). With
    ``stats`` and ``entropy`` from ``pgest::sample`` the logits are not read again."""
    check_rows(logits, actions)
    check_weights(logits, actions, weights)
    entropy_weight = check_entropy_weight(entropy_weight)
    if (stats is None) != (entropy is None):
        raise ValueError("stats and entropy go together (both from pgest::sample of these logits) or are both None, "
                         f"got stats={'None' if stats is None else 'a tensor'}, "
                         f"entropy={'None' if entropy is None else 'a tensor'}")
    if stats is not None:
        check_stats(logits, stats, entropy)
    _, ent, st, loss = forward_rows(logits, index_tensor(actions, logits.shape[1]), ignore_index,
                                    weights=weights.contiguous(), entropy_weight=entropy_weight,
                                    want_entropy=entropy_weight != 0.0, stats=stats, entropy=entropy)
    return loss, st, ent


@policy_loss_op.register_fake
def _(logits, actions, weights, entropy_weight, ignore_index, stats, entropy):
    R = logits.shape[0]
    acc = _checks.stats_dtype(logits.dtype)
    return logits.new_empty((R,), dtype=acc), logits.new_empty((2, R), dtype=acc), logits.new_empty((R,), dtype=acc)


@torch.library.custom_op("pgest::policy_loss_backward", mutates_args=())
def policy_loss_backward_op(grad_loss: Tensor, logits: Tensor, actions: Tensor, weights: Tensor, stats: Tensor,
                         entropy: Tensor, entropy_weight: float, ignore_index: int) -> Tensor:
    """d loss / d logits for upstream (R,) grad_loss: one read of the logits,
    every gradient entry written once (no zero-fill)."""
    check_rows(logits, actions)
    check_weights(logits, actions, weights)
    check_stats(logits, stats, entropy)
    entropy_weight = check_entropy_weight(entropy_weight)
    _checks.check_float_tensor(grad_loss, "grad_loss")
    if grad_loss.shape != (logits.shape[0],):
        raise ValueError(f"grad_loss must have shape ({logits.shape[0]},), got {tuple(grad_loss.shape)}")
    return _backward_rows(grad_loss, logits, index_tensor(actions, logits.shape[1]), weights, stats, entropy,
                          entropy_weight, ignore_index)


@policy_loss_backward_op.register_fake
def _(grad_loss, logits, actions, weights, stats, entropy, entropy_weight, ignore_index):
    return logits.new_empty(tuple(logits.shape))


def _backward_rows(grad_loss, logits, actions, weights, stats, entropy, entropy_weight, ignore_index):
    # loss = -sum_s w_s lp_s - beta H: g_s = -up w_s, g_H = -up beta (log_prob.h)
    return backward_rows(logits, actions, ignore_index, stats, entropy, grad_log_prob=weights,
                         row_scale=grad_loss, log_prob_scale=-1.0, entropy_scale=-entropy_weight)


def _grad_with_graph(grad_loss, logits, actions, weights, entropy_weight, ignore_index):
    """_backward_rows's gradient in differentiable torch ops (a second
    derivative or a torch.func transform: see log_prob.grad_in_torch_ops)."""
    up = grad_loss.reshape(-1, 1)
    return grad_in_torch_ops(logits, actions, ignore_index, -weights * up, -entropy_weight * up)


def _setup_context(ctx, inputs, output):
    logits, actions, weights, entropy_weight, ignore_index, _, _ = inputs
    _, stats, entropy = output
    ctx.save_for_backward(logits, actions, weights, stats, entropy)
    ctx.entropy_weight, ctx.ignore_index = entropy_weight, ignore_index
    ctx.mark_non_differentiable(stats, entropy)


def _backward(ctx, grad_loss, _grad_stats, _grad_entropy):
    logits, actions, weights, stats, entropy = ctx.saved_tensors
    if creating_graph():  # not through the op: its output would be a constant
        grad = _grad_with_graph(grad_loss, logits, index_tensor(actions, logits.shape[1]), weights, ctx.entropy_weight,
                                ctx.ignore_index)
        return grad, None, None, None, None, None, None
    grad = policy_loss_backward_op(grad_loss, logits, actions, weights, stats, entropy,
                                ctx.entropy_weight, ctx.ignore_index)
    return grad, None, None, None, None, None, None


policy_loss_op.register_autograd(_backward, setup_context=_setup_context)


register_rows(policy_loss_op, (ROWS, ROWS, ROWS, None, None, STATS, ROWS), (ROWS, STATS, ROWS))


register_rows(policy_loss_backward_op, (ROWS, ROWS, ROWS, ROWS, STATS, ROWS, None, None), (ROWS,))


class _FuncPolicyLoss(torch.autograd.Function):
    """The route under torch.func transforms (see log_prob._FuncLogProb):
    per-row losses from the registered op, the gradient in torch ops."""

    generate_vmap_rule = True

    @staticmethod
    def forward(logits, actions, weights, entropy_weight, ignore_index):
        return policy_loss_op(logits, actions, weights, entropy_weight, ignore_index, None, None)[0]

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits, actions, weights, entropy_weight, ignore_index = inputs
        ctx.save_for_backward(logits, actions, weights)
        ctx.save_for_forward(logits, actions, weights)
        ctx.entropy_weight, ctx.ignore_index = entropy_weight, ignore_index

    @staticmethod
    def backward(ctx, grad_loss):
        logits, actions, weights = ctx.saved_tensors
        return _grad_with_graph(grad_loss, logits, actions, weights, ctx.entropy_weight, ctx.ignore_index), \
            None, None, None, None

    @staticmethod
    def jvp(ctx, tangent, *_):
        logits, actions, weights = ctx.saved_tensors
        d_lp, d_ent = tangent_in_torch_ops(logits, actions, ctx.ignore_index, tangent)
        return -weighted_log_probs(weights, d_lp).sum(1) - ctx.entropy_weight * d_ent


class _PolicyLossFn(torch.autograd.Function):
    """The eager route to the same kernels (see pgest.log_prob). Only the
    logits are an input of apply(); the reduction happens inside, so a
    scalar loss adds no Sum/Div nodes to the graph: its backward hands the
    kernel the row scale (upstream / count) as an expanded scalar."""

    @staticmethod
    def forward(ctx, logits, aux):
        actions, weights, entropy_weight, ignore_index, stats, entropy, reduction, divisor = aux
        _, ent, st, loss = forward_rows(logits, actions, ignore_index, weights=weights,
                                        entropy_weight=entropy_weight, want_entropy=entropy_weight != 0.0,
                                        stats=stats, entropy=entropy)
        ctx.save_for_backward(logits, actions, weights, st, ent)
        ctx.entropy_weight, ctx.ignore_index, ctx.reduction = entropy_weight, ignore_index, reduction
        ctx.count = None
        if reduction == "none":
            return loss
        total = loss.sum()
        if reduction == "sum":
            return total
        ctx.count = count_actions(actions, ignore_index, divisor)
        return total / ctx.count

    @staticmethod
    def backward(ctx, grad_out):
        logits, actions, weights, st, ent = ctx.saved_tensors
        R = logits.shape[0]
        if ctx.reduction == "none":
            scale = grad_out
        else:  # the rows' common upstream gradient, read with stride 0
            scale = (grad_out if ctx.count is None else grad_out / ctx.count).expand(R)
        if creating_graph():
            return _grad_with_graph(scale, logits, actions, weights, ctx.entropy_weight, ctx.ignore_index), None
        if batched_upstream(grad_out):  # the registered op has the vmap rule
            return policy_loss_backward_op(scale.reshape(R), logits, actions, weights, st, ent, ctx.entropy_weight,
                                        ctx.ignore_index), None
        grad = _backward_rows(scale, logits, actions, weights, st, ent, ctx.entropy_weight, ctx.ignore_index)
        return grad, None


_apply_policy_loss = fast_apply(_PolicyLossFn)


def count_actions(actions: Tensor, ignore_index: Optional[int], divisor: Optional[int] = None):
    """The mean's denominator: ``divisor`` when given, else the number of
    actions that count (a tensor)."""
    if divisor is not None:
        return divisor
    if ignore_index is None:
        return actions.numel()
    return (actions != ignore_index).sum()


def loss_rows(x: Tensor, actions: Tensor, weights: Tensor, entropy_weight: float, ignore_index: int,
              stats: Optional[Tensor] = None, entropy: Optional[Tensor] = None, reduction: str = "none",
              divisor: Optional[int] = None) -> Tensor:
    """Surrogate losses of (R, K) logits, (R,) per row or reduced ("sum",
    "mean": over ``divisor``, or else over the actions that count), by the
    cheapest route that applies (int64 contiguous actions, contiguous weights
    in the accumulation dtype)."""
    if functorch_active():
        rows = _FuncPolicyLoss.apply(x, actions, weights, entropy_weight, ignore_index)
    elif traced():
        rows = policy_loss_op(x, actions, weights, entropy_weight, ignore_index, stats, entropy)[0]
    elif x.requires_grad and torch.is_grad_enabled():
        return _apply_policy_loss(x, (actions, weights, entropy_weight, ignore_index, stats, entropy, reduction,
                                      divisor))
    else:
        rows = forward_rows(x, actions, ignore_index, weights=weights, entropy_weight=entropy_weight,
                            want_entropy=entropy_weight != 0.0, stats=stats, entropy=entropy)[3]
    if reduction == "none":
        return rows
    return rows.sum() if reduction == "sum" else rows.sum() / count_actions(actions, ignore_index, divisor)
