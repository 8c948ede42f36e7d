"""pgest.linear_policy_loss: pgest.policy_loss from hidden states and an LM
head, without building the logits, in three matrix products instead of four.

A loss that is a fixed weighted sum of per-token terms,

    L = c * sum_t ( -sum_s A_ts log p(a_ts) - beta H_t )      (c = 1 or 1 / count)

has per-token upstream gradients known before the backward runs
(g_lp = -c A, g_H = -c beta, times the scalar that arrives later). So the
forward finishes the job: per token tile, the logits over the whole
vocabulary once (product 1), their statistics merged over the vocabulary
tiles exactly as ``linear_log_prob`` merges them (the same numbers), the
gradient of each vocabulary tile by the native backward, and the two
products into hidden's and weight's gradients (2 and 3). The backward only
scales them by the upstream scalar, in place. ``linear_log_prob`` cannot do
this: its upstream gradients are whatever the objective makes of its
outputs, so it recomputes the logits in the backward (four products).

Workspace: one (token tile, V) logits buffer (which then holds their
gradient, so that products 2 and 3 run over the whole vocabulary at once), a
(token tile, vocabulary tile) gradient tile, a (token tile, H) product and
O(tokens) numbers;
the token tile is sized so that the buffer stays a small fraction of the
logits (see _fused_token_tile). The gradients themselves exist from the
forward on: they are the gradients the caller asked for, only earlier.
"""
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .. import _checks, _status
from .._apply import fast_apply
from .._checks import (
    check_actions_range,
    check_entropy_weight,
    check_head,
    check_head_rows,
    check_ignore_index,
    check_needs,
    check_softcap,
    check_tile,
    check_token_actions,
    check_weights,
    index_tensor,
)
from .._vmap import register_per_element
from ..ops.log_prob import batched_upstream, creating_graph, functorch_active, traced
from ..ops.policy_loss import REDUCTIONS, count_actions, weighted_log_probs
from .head import (
    NEVER_BUILT,
    chosen_logits,
    head_grads_in_torch_ops,
    linear_log_prob,
    live_rows,
    tile_sizes,
    token_rows,
    token_tile_grads,
    token_tile_stats,
)
from .tiles import PIECE, logits_dtype, logits_tile

# The fused route keeps one token tile's logits over the whole vocabulary,
# a vocabulary tile's gradient and the tile's hidden gradient (all in the
# inputs' dtype; a vocabulary piece's columns for the second): at most FUSED_BYTES, and at
# most 1/FUSED_FRACTION of the whole logits (so that the workspace stays a
# small part of what is never built), but never fewer than FUSED_MIN_TOKENS
# tokens (smaller products run the matmul library well below its rate:
# measured on the CPU, M = 64 at 1/3 of M = 256). Tiles are multiples of 32.
# The tile is what sets the speed: the three products over (tile, 2048) x
# (2048, 32000) fp32 for 2048 tokens took 6.2, 5.3, 5.0, 4.7 and 4.5 s at
# tiles of 128, 224, 352, 512 and 1024 tokens (CPU, medians of 3,
# interleaved), so the fraction is as large as the bound of 1/20
# of the logits leaves room for (the other buffers are in the formula).
FUSED_BYTES = {"cpu": 96 << 20, "cuda": 512 << 20}
FUSED_FRACTION = 22
FUSED_MIN_TOKENS = 128


def _fused_token_tile(n_tokens: int, V: int, H: int, dtype: torch.dtype, device: torch.device) -> int:
    size, lsize = dtype.itemsize, logits_dtype(dtype).itemsize
    budget = min(FUSED_BYTES.get(device.type, FUSED_BYTES["cpu"]), n_tokens * V * size // FUSED_FRACTION)
    # per token: its logits (float32 for 16-bit inputs) and, for 16-bit
    # inputs, their gradient in the inputs' dtype; a vocabulary tile's
    # gradient; hidden's gradient
    per_token = V * lsize + (V * size if lsize != size else 0) + min(V, PIECE) * lsize + H * size
    tn = budget // per_token // 32 * 32
    return max(1, min(n_tokens, max(FUSED_MIN_TOKENS, tn)))


def _fused(h2: Tensor, weight: Tensor, bias: Optional[Tensor], actions: Tensor, adv: Tensor, beta: float,
           ignore_index: Optional[int], temperature: float, tn: int, scale: Tensor,
           needs: List[bool], softcap: float = 0.0
           ) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """-> (loss, grad_h, grad_w, grad_b) of loss = scale * sum over tokens of
    (-sum_s adv_s log p(a_s) - beta H), the gradients for an upstream 1
    (None where ``needs`` says no)."""
    N, S = actions.shape
    V = weight.shape[0]
    dev = h2.device
    acc = _checks.stats_dtype(h2.dtype)
    check_actions_range(actions, V, ignore_index)
    need_h, need_w, need_b = needs
    # contiguous whatever the inputs' strides, as the fake kernel reports
    grad_h = torch.zeros(h2.shape, dtype=h2.dtype, device=h2.device) if need_h else None
    grad_w = torch.zeros(weight.shape, dtype=weight.dtype, device=weight.device) if need_w else None
    grad_b = torch.zeros((V,), dtype=acc, device=dev) if need_b else None
    total = torch.zeros((), dtype=acc, device=dev)
    live = live_rows(actions, ignore_index)
    n_live = N if live is None else live.shape[0]
    # one buffer for every token tile: a fresh (tile, V) tensor per tile would
    # pay its page faults each time on the CPU (most of a product's time)
    full = torch.empty((min(tn, n_live), V), dtype=logits_dtype(h2.dtype), device=dev) if n_live else None
    # 16-bit inputs: the gradient of the float32 logits, in the inputs' dtype for the products
    grads16 = (torch.empty((min(tn, n_live), V), dtype=h2.dtype, device=dev)
               if n_live and full.dtype != h2.dtype and any(needs) else None)
    zero = torch.zeros((), dtype=acc, device=dev)
    for n0 in range(0, n_live, tn):
        rows = slice(n0, n0 + tn) if live is None else live[n0:n0 + tn]
        h, a, w = h2[rows], actions[rows], adv[rows]
        x = logits_tile(h, weight, bias, 0, V, temperature, out=full[:h.shape[0]], softcap=softcap)
        where = n0 if live is None else rows
        M, LZ, H = token_tile_stats(h, where, weight, bias, temperature, full=x).result(acc, where, NEVER_BUILT)
        keep = a != ignore_index if ignore_index is not None else torch.ones_like(a, dtype=torch.bool)
        lp = torch.where(keep, (chosen_logits(h, weight, bias, a, temperature, h.shape[0], keep, softcap=softcap)
                                - M[:, None])
                         - LZ[:, None], zero)
        total += -weighted_log_probs(w, lp).sum() - beta * H.sum()
        if any(needs):
            upstream = {"grad_log_prob": w, "row_scale": scale.expand(h.shape[0]), "log_prob_scale": -1.0,
                        "entropy_scale": -beta}
            gh = token_tile_grads(h, a, torch.stack([M, LZ]), H, upstream, weight, bias, ignore_index, temperature,
                                   0, V, need_h, grad_w, grad_b, full=x,
                                   grads16=None if grads16 is None else grads16[:h.shape[0]], softcap=softcap)
            if need_h:
                grad_h[rows] = gh.to(grad_h.dtype)
        del x
    if need_b:
        grad_b = grad_b.to(bias.dtype)
    return total * scale, grad_h, grad_w, grad_b


def _scale(actions: Tensor, ignore_index: Optional[int], reduction: str, acc: torch.dtype) -> Tensor:
    """The loss's constant factor as a 0-dim tensor (no host read of the
    count: a sync on a GPU); a mean over nothing is nan, as cross_entropy's."""
    if reduction == "sum":
        return torch.ones((), dtype=acc, device=actions.device)
    return 1.0 / torch.as_tensor(count_actions(actions, ignore_index), dtype=acc, device=actions.device)


# ---- the registered op (torch.compile) and its autograd -----------------------------

@torch.library.custom_op("pgest::linear_policy_loss", mutates_args=())
def linear_policy_loss_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], actions: Tensor,
                            advantages: Tensor, entropy_weight: float, ignore_index: Optional[int],
                            temperature: float, reduction: str, token_tile: int, vocab_tile: int,
                            needs: List[bool], softcap: float = 0.0) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(N, H) hidden, (V, H) weight, (N, S) actions and advantages (the
    accumulation dtype) -> (loss (), and the gradients of hidden, weight and
    bias for an upstream 1, an empty tensor where ``needs`` says no)."""
    check_head_rows(hidden, weight, bias, actions, temperature)
    check_weights(hidden, actions, advantages, "advantages", "hidden")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum' here, got {reduction!r}")
    check_needs(needs)
    a = index_tensor(actions, weight.shape[0])
    ii = check_ignore_index(ignore_index)
    check_tile(vocab_tile, "vocab_tile", 1)  # checked; the vocabulary goes in fixed pieces
    loss, gh, gw, gb = _fused(hidden, weight, bias, a, advantages.contiguous(), check_entropy_weight(entropy_weight),
                              ii, temperature, check_tile(token_tile, "token_tile", 1),
                              _scale(a, ii, reduction, advantages.dtype),
                              [bool(needs[0]), bool(needs[1]), bool(needs[2]) and bias is not None],
                              check_softcap(softcap))
    empty = hidden.new_empty((0,))
    return (loss, gh if gh is not None else empty, gw if gw is not None else empty.clone(),
            gb if gb is not None else empty.clone())


@linear_policy_loss_op.register_fake
def _(hidden, weight, bias, actions, advantages, entropy_weight, ignore_index, temperature, reduction, token_tile,
      vocab_tile, needs, softcap=0.0):
    check_needs(needs)
    acc = _checks.stats_dtype(hidden.dtype)
    return (hidden.new_empty((), dtype=acc),
            hidden.new_empty(hidden.shape) if needs[0] else hidden.new_empty((0,)),
            weight.new_empty(weight.shape) if needs[1] else hidden.new_empty((0,)),
            bias.new_empty(bias.shape) if needs[2] and bias is not None else hidden.new_empty((0,)))


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, actions, advantages, entropy_weight, ignore_index, temperature, reduction = inputs[:9]
    ctx.save_for_backward(*output[1:], hidden, weight, bias, actions, advantages)
    ctx.args = (entropy_weight, ignore_index, temperature, reduction, inputs[12])
    ctx.has_bias = inputs[2] is not None
    ctx.mark_non_differentiable(*output[1:])


def _backward_op(ctx, grad_loss, _gh, _gw, _gb):
    gh, gw, gb, hidden, weight, bias, actions, advantages = ctx.saved_tensors
    if creating_graph():  # the saved gradients are constants: recompute them differentiably
        entropy_weight, ignore_index, temperature, reduction, softcap = ctx.args
        a = index_tensor(actions, weight.shape[0])
        scale = _scale(a, ignore_index, reduction, advantages.dtype)
        return _grads_with_graph(ctx.needs_input_grad, grad_loss, hidden, weight, bias, a, advantages, entropy_weight,
                                 ignore_index, temperature, scale, softcap) + (None,) * 10
    def pick(g, i):
        return g * grad_loss.to(g.dtype) if ctx.needs_input_grad[i] and g.numel() else None
    return (pick(gh, 0), pick(gw, 1), pick(gb, 2) if ctx.has_bias else None,
            None, None, None, None, None, None, None, None, None, None)


linear_policy_loss_op.register_autograd(_backward_op, setup_context=_setup_context)
register_per_element(linear_policy_loss_op)


class _LinearPolicyLossFn(torch.autograd.Function):
    """The eager route. The gradients computed in the forward are handed to
    the first backward, scaled in place, and this node lets go of them: no
    second copy of weight's gradient is ever made (autograd takes the
    tensor as .grad). A later backward through the same graph (retain_graph,
    gradcheck) computes them again from the saved inputs."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, aux):
        loss, gh, gw, gb = _fused(hidden, weight, bias, *aux)
        ctx.save_for_backward(hidden, weight, bias)
        ctx.aux, ctx.grads = aux, (gh, gw, gb)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if creating_graph():  # the forward's gradients are constants: recompute them differentiably
            ctx.grads = None
            a2, w2, beta, ii, temperature, _, scale, _, softcap = ctx.aux
            return _grads_with_graph(ctx.needs_input_grad, grad_loss, *ctx.saved_tensors, a2, w2, beta, ii,
                                     temperature, scale, softcap) + (None,)
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            grads = _fused(*ctx.saved_tensors, *ctx.aux)[1:]
        if batched_upstream(grad_loss):  # vmapped upstream (batched gradients): no host read, no in-place
            return tuple(None if g is None else g * grad_loss.to(g.dtype) for g in grads) + (None,)
        # On the CPU a unit upstream (loss.backward()) is read for free and
        # skips a pass over weight's gradient; on a GPU that read would sync.
        unit = not grad_loss.is_cuda and float(grad_loss) == 1.0
        out = []
        for g in grads:
            if g is not None and not unit:
                g.mul_(grad_loss.to(g.dtype))
            out.append(g)
        del grads
        return out[0], out[1], out[2], None


def _grads_with_graph(needs, grad_loss, hidden, weight, bias, actions, advantages, entropy_weight, ignore_index,
                      temperature, scale, softcap) -> tuple:
    """The loss's gradients in differentiable torch ops (a second derivative:
    see linear_head.head_grads_in_torch_ops)."""
    up = (grad_loss * scale).to(advantages.dtype)
    return head_grads_in_torch_ops(hidden, weight, bias, actions, ignore_index, temperature, -advantages * up,
                                   (-entropy_weight * up).expand(actions.shape[0]), needs, softcap)


_apply_fused = fast_apply(_LinearPolicyLossFn)


# ---- the public function ------------------------------------------------------------

def linear_policy_loss(hidden: Tensor, weight: Tensor, actions: Tensor, advantages: Tensor, *,
                       bias: Optional[Tensor] = None, temperature: float = 1.0, entropy_weight: float = 0.0,
                       ignore_index: Optional[int] = -100, reduction: str = "mean",
                       token_tile: Optional[int] = None, vocab_tile: Optional[int] = None,
                       softcap: Optional[float] = None) -> Tensor:
    """``pgest.policy_loss`` of ``logits = (hidden @ weight.T + bias) / temperature``
    without building the logits: ``-advantage * log p(action)`` per action,
    ``- entropy_weight * H`` per token, reduced like ``cross_entropy``.

    With ``reduction="mean"`` (over the actions that are not ``ignore_index``)
    or ``"sum"`` the gradients are computed in the forward, three matrix
    products in all (``linear_log_prob`` followed by the same formula takes
    four: it recomputes the logits in the backward); the backward scales
    them by the upstream gradient. Such a graph can be backpropagated once.
    Any loss that is a fixed weighted sum of per-token terms is this one with
    the weights folded into ``advantages`` and ``reduction="sum"``
    (``seq-mean-token-mean``: A_t / (T_seq * num_seqs)). ``"none"`` returns
    the per-token losses through ``linear_log_prob`` (four products).

    The per-token log-probabilities and entropies are ``linear_log_prob``'s
    (the same vocabulary tiles merged in the same order), so this loss equals
    ``-(advantages * linear_log_prob(...).log_prob).mean() - entropy_weight *
    entropy.mean()``-style formulas to rounding, and exactly when the products
    agree bit for bit.

    Args:
        hidden: (..., H) float32/float64/float16/bfloat16; leading dims are tokens.
        weight: (V, H), dtype of hidden; bias: optional (V,).
        actions: (...,) token ids or (..., S) for S per token; ``ignore_index``
            entries count for nothing (a token whose actions are all ignored
            is skipped: no loss, no entropy term, no work).
        advantages: floats of the shape of ``actions``, constants.
        softcap: the logits' final soft-capping before the temperature, as
            :func:`linear_log_prob` takes it (Gemma 2).
        token_tile, vocab_tile: tile sizes; the fused route keeps one token
            tile's logits over the whole vocabulary (default: the tile and
            its gradient buffers within 96 MiB on the CPU
            and 1/22 of the logits, at least 128 tokens).

    Returns the loss, float32 for 16-bit inputs (float64 for float64).
    """
    temperature = check_head(hidden, weight, bias, temperature)
    softcap = check_softcap(softcap)
    lead, S = check_token_actions(hidden, actions)
    _checks.check_float_tensor(advantages, "advantages")
    if advantages.shape != actions.shape:
        raise ValueError(f"advantages must have shape {tuple(actions.shape)} like actions, "
                         f"got {tuple(advantages.shape)}")
    _checks.check_device(advantages, "advantages", hidden.device, "hidden")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    beta = check_entropy_weight(entropy_weight)
    ii = check_ignore_index(ignore_index)
    if reduction == "none" or functorch_active():  # torch.func: through linear_log_prob's route for it
        lp, ent = linear_log_prob(hidden, weight, actions, bias=bias, temperature=temperature, ignore_index=ii,
                                  token_tile=token_tile, vocab_tile=vocab_tile, softcap=softcap)
        wlp = weighted_log_probs(advantages.detach().to(lp.dtype), lp)
        per = -(wlp if S == 1 and actions.shape == lead else wlp.sum(-1)) - beta * ent
        if reduction == "none":
            return per
        return per.sum() if reduction == "sum" else per.sum() / count_actions(actions, ii)
    _, tv = tile_sizes(hidden, None, vocab_tile)  # checked; the vocabulary goes in fixed pieces
    h2 = token_rows(hidden)
    N = h2.shape[0]
    tn = (check_tile(token_tile, "token_tile", 1) if token_tile is not None
          else _fused_token_tile(N, weight.shape[0], weight.shape[1], hidden.dtype, hidden.device))
    traced()  # under torch.func transforms: raises with what to do instead
    acc = _checks.stats_dtype(hidden.dtype)
    a2 = index_tensor(actions, weight.shape[0]).reshape(-1, S)
    w2 = advantages.detach().reshape(-1, S)
    if w2.dtype != acc or not w2.is_contiguous():
        w2 = w2.to(acc).contiguous()
    grad_on = torch.is_grad_enabled()
    needs = [grad_on and hidden.requires_grad, grad_on and weight.requires_grad,
             grad_on and bias is not None and bias.requires_grad]
    try:
        if torch.compiler.is_compiling() or not any(needs):
            return linear_policy_loss_op(h2, weight, bias, a2, w2, beta, ii, temperature, reduction, tn, tv,
                                           needs, softcap)[0]
        return _apply_fused(h2, weight, bias, (a2, w2, beta, ii, temperature, tn, _scale(a2, ii, reduction, acc),
                                               needs, softcap))
    except (ValueError, IndexError) as e:
        raise type(e)(_status.unflatten_message(str(e), lead)) from None
