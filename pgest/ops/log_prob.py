"""The log_prob kernels' launch, their registration as torch ops (fake
kernels, autograd, vmap) and the eager fast path; the public functions are
in pgest/log_prob.py."""
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _C, _checks, _native, _status
from .._apply import fast_apply
from .._checks import (
    check_rows,
    check_stats,
    check_upstream,
    index_tensor,
)
from .._native import functorch_active, traced  # noqa: F401  (the ops' route choice, imported from here)
from .._vmap import ROWS, STATS, register_rows
from .truncation import fill_params, raise_for


def _args(x: Tensor, actions: Optional[Tensor], ignore_index: Optional[int]) -> "_C.LogProbArgs":
    a = _C.LogProbArgs()
    a.logits = x.data_ptr()
    a.dtype = _checks.DTYPE_CODES[x.dtype]
    a.rows, a.cols = x.shape
    a.row_stride, a.col_stride = x.stride()
    if actions is not None:
        a.actions = actions.data_ptr()
        a.num_samples = actions.shape[1]
    if ignore_index is None:
        a.has_ignore_index = False
    else:
        a.ignore_index = ignore_index
    a.num_threads = torch.get_num_threads()
    return a


_CPU_KERNELS = {"log_prob_forward": _C.log_prob_forward_cpu, "log_prob_backward": _C.log_prob_backward_cpu}


def _run(kernel: str, a, x: Tensor, actions: Optional[Tensor], ignore_index: Optional[int], values: bool,
         num_actions: int = -1) -> None:
    if not x.is_cuda:
        res = _CPU_KERNELS[kernel](a)
        if res[0]:  # _status.OK is 0
            _status.raise_for_status(res, **_report(x, actions, ignore_index, num_actions))
        return
    report = _report(x, actions, ignore_index, num_actions)
    res = _native.cuda_call(kernel, a, x.device, report=report, values=x if values else None, actions=actions)
    if res[0]:
        _status.raise_for_status(res, **report)


def _report(x: Tensor, actions: Optional[Tensor], ignore_index: Optional[int], num_actions: int) -> dict:
    """What the log_prob kernels' error messages need to know of a call."""
    return dict(input_name="logits", num_actions=x.shape[1] if num_actions < 0 else num_actions,
                samples_per_row=0 if actions is None else actions.shape[1], ignore_index=ignore_index)


def _truncate(a, x: Tensor, truncation) -> None:
    """Point a CPU call's truncation block (log_prob.h) at ``truncation``:
    (filters (pgest.truncation.Filters), the threshold to replay or None,
    the (R,) threshold to write or None[, an outside sampler's checked
    (ids, offsets) int64 lists or None])."""
    if x.is_cuda:
        raise NotImplementedError("the log_prob kernels take kept sets on the CPU only")
    f, given, out, *kept = truncation
    fill_params(a.truncation, *f, given_threshold=given, threshold=out)
    if kept and kept[0] is not None:
        a.truncation.kept_ids, a.truncation.kept_offsets = kept[0][0].data_ptr(), kept[0][1].data_ptr()


def forward_rows(x: Tensor, actions: Optional[Tensor], ignore_index: Optional[int], *, weights: Optional[Tensor] = None,
                 entropy_weight: float = 0.0, want_entropy: bool = True, stats: Optional[Tensor] = None,
                 entropy: Optional[Tensor] = None, shapes=None, fresh_stats: bool = True, truncation=None):
    """(R, K) logits and (R, S) int64 contiguous actions (or None) ->
    (log_prob (R, S), entropy (R,), stats (2, R) = [row max, log Z], loss (R,)
    or None). ``weights`` (R, S) adds the fused surrogate
    loss = -sum_s w_s log_prob_s - entropy_weight * H. With ``stats`` and
    ``entropy`` from ``pgest::sample`` the logits' rows are not read again.
    ``shapes``: (log_prob shape, entropy shape) to allocate the outputs in
    (same element counts): the caller's shapes, so that no view (and no
    view node in the autograd graph) is needed afterwards. ``truncation``:
    score each row's kept set (_truncate; CPU), as the same call on the
    kept logits would, without forming them."""
    R = x.shape[0]
    S = 0 if actions is None else actions.shape[1]
    acc = _checks.stats_dtype(x.dtype)
    dev = _native.device_of(x)
    lp = _native.empty((R, S) if shapes is None else shapes[0], acc, dev)
    if stats is not None:
        # fresh tensors: a custom op's outputs may not alias its inputs (the
        # eager route only saves the statistics: no copy needed there)
        st = stats.to(acc).contiguous()
        st = st.clone() if fresh_stats else st
        ent = entropy.to(acc).contiguous().clone()
        if shapes is not None:
            ent = ent.view(shapes[1])
    else:
        st = torch.empty(2, R, dtype=acc, device=dev)
        ent = _native.empty((R,) if shapes is None else shapes[1], acc, dev)
    loss = torch.empty(R, dtype=acc, device=dev) if weights is not None else None
    if R:
        a = _args(x, actions, ignore_index)
        a.log_prob, a.entropy = lp.data_ptr(), ent.data_ptr()
        a.row_max = st.data_ptr()
        a.log_z = a.row_max + R * st.element_size()
        a.want_entropy = want_entropy
        a.stats_given = stats is not None
        if weights is not None:
            a.weights, a.loss, a.entropy_weight = weights.data_ptr(), loss.data_ptr(), entropy_weight
        if truncation is not None:
            _truncate(a, x, truncation)
            res = _C.log_prob_forward_cpu(a)
            if res[0]:
                if res[0] == _status.NONFINITE_INPUT:  # x / T overflowed, or a NaN
                    raise_for(res, truncation[0].temperature, x.shape[1])
                _status.raise_for_status(res, **_report(x, actions, ignore_index, -1))
        else:
            _run("log_prob_forward", a, x, actions, ignore_index, values=True)
    return lp, ent, st, loss


def _acc_rows(t: Tensor, acc: torch.dtype, R: int, S: int = 0) -> Tensor:
    """An upstream gradient as (R,) (or (R, S)) rows of the accumulation
    type, strided where it can be (no copy of an expanded scalar)."""
    if t.dtype != acc:
        t = t.to(acc)
    if S:
        if not (t.dim() == 2 and t.shape[0] == R) and not (S == 1 and t.dim() == 1):
            t = t.reshape(R, S)
    elif t.dim() != 1:
        t = t.reshape(R)  # the caller's (B, T, ...) rows
    return t


def backward_rows(x: Tensor, actions: Optional[Tensor], ignore_index: Optional[int], stats: Tensor, entropy: Tensor, *,
                  grad_log_prob: Optional[Tensor] = None, grad_entropy: Optional[Tensor] = None,
                  row_scale: Optional[Tensor] = None, log_prob_scale: float = 1.0,
                  entropy_scale: float = 0.0, col_offset: int = 0, total_cols: int = 0,
                  out: Optional[Tensor] = None, truncation=None) -> Tensor:
    """d L / d logits (R, K), contiguous, dtype of the logits, from the
    upstream gradients g_s = row_scale * log_prob_scale * grad_log_prob and
    g_H = row_scale * (grad_entropy or entropy_scale) (log_prob.h). Every
    action is checked again before it is used as an index. With
    ``total_cols``, ``x`` is the vocabulary tile [col_offset, col_offset + K)
    of rows of ``total_cols`` entries whose statistics ``stats`` hold.
    ``out``: a contiguous (R, K) buffer of x's dtype to write into (not
    ``x`` itself: an action's entry rereads x after the dense pass).
    ``truncation``: (filters, the forward's threshold, None) of a truncated
    forward (_truncate): the gradient of its kept set's scores."""
    R, K = x.shape
    grad = torch.empty(R, K, dtype=x.dtype, device=_native.device_of(x)) if out is None else out
    if not R or not K:  # K = 0: an empty vocabulary shard or tile has no gradient to write
        return grad
    acc = _checks.stats_dtype(x.dtype)
    a = _args(x, actions, ignore_index)
    # Upstream gradients are read where they lie, with strides: from a sum or
    # a mean they are expanded scalars (stride 0), and copying them would
    # cost more than the kernel at RL sizes. Converted ones are kept alive in
    # `keep` until the call returns.
    keep = []
    if not stats.is_contiguous():
        stats = stats.contiguous()
        keep.append(stats)
    a.row_max = stats.data_ptr()
    a.log_z = a.row_max + R * stats.element_size()
    if entropy.dtype != acc or not entropy.is_contiguous():
        entropy = entropy.to(acc).contiguous()
        keep.append(entropy)
    a.entropy = entropy.data_ptr()
    if grad_log_prob is not None and actions is not None:
        g = _acc_rows(grad_log_prob, acc, R, actions.shape[1])
        keep.append(g)
        a.grad_log_prob = g.data_ptr()
        a.grad_log_prob_row_stride, a.grad_log_prob_sample_stride = g.stride() if g.dim() == 2 else (g.stride(0), 0)
    if grad_entropy is not None:
        g = _acc_rows(grad_entropy, acc, R)
        keep.append(g)
        a.grad_entropy, a.grad_entropy_stride = g.data_ptr(), g.stride(0)
    if row_scale is not None:
        g = _acc_rows(row_scale, acc, R)
        keep.append(g)
        a.row_scale, a.row_scale_stride = g.data_ptr(), g.stride(0)
    a.log_prob_scale, a.entropy_scale = log_prob_scale, entropy_scale
    if total_cols:
        a.col_offset, a.total_cols = col_offset, total_cols
    a.grad = grad.data_ptr()
    if truncation is not None:
        _truncate(a, x, truncation)
    if x.is_cuda and actions is not None and actions.shape[1] > _native.PAIRWISE_SAMPLES:
        keep.append(torch.empty(actions.shape, dtype=torch.int64, device=x.device))  # for_each_action scratch
        a.order = keep[-1].data_ptr()
    _run("log_prob_backward", a, x, actions, ignore_index, values=False, num_actions=total_cols or K)
    return grad


def creating_graph() -> bool:
    """Whether this backward is itself to be differentiated (create_graph=True)."""
    return torch.is_grad_enabled()


def _softmax_parts(x: Tensor):
    """(accumulation dtype, log p, p, log p with 0 where p is 0, H (R, 1))."""
    acc = _checks.stats_dtype(x.dtype)
    ls = torch.log_softmax(x.to(acc), -1)
    p = ls.exp()
    ls0 = ls.masked_fill(p == 0, 0.0)
    return acc, ls, p, ls0, -(p * ls0).sum(-1, keepdim=True)


def grad_in_torch_ops(x: Tensor, actions: Optional[Tensor], ignore_index: Optional[int],
                      grad_log_prob: Optional[Tensor], grad_entropy: Optional[Tensor]) -> Tensor:
    """The gradient backward_rows computes (log_prob.h), in differentiable
    torch ops: for log p_s = x_{a_s} - log Z and H = -sum p log p,

        d/dx [sum_s g_s log p_s + g_H H] = sum_s g_s (onehot(a_s) - p) - g_H p (log p + H),

    with the kernels' conventions: an ignored action contributes nothing, a
    row whose every action is ignored gets no gradient, p log p is 0 where p
    is 0 (no 0 * -inf)."""
    R = x.shape[0]
    acc, ls, p, ls0, H = _softmax_parts(x)
    zero = torch.zeros((), dtype=acc, device=x.device)
    live = None
    grad = torch.zeros_like(ls)
    if actions is not None:
        keep = None if ignore_index is None else actions != ignore_index
        if keep is not None and actions.shape[1]:
            live = keep.any(1)
        if grad_log_prob is not None:
            g = grad_log_prob.reshape(R, actions.shape[1]).to(acc)
            idx = actions
            if keep is not None:
                g, idx = torch.where(keep, g, zero), torch.where(keep, actions, 0)
            grad = grad.scatter_add(1, idx, g) - g.sum(1, keepdim=True) * p
    if grad_entropy is not None:
        gh = grad_entropy.reshape(R).to(acc)
        if live is not None:
            gh = torch.where(live, gh, zero)
        grad = grad - gh[:, None] * p * (ls0 + H)
    return grad.to(x.dtype)


def tangent_in_torch_ops(x: Tensor, actions: Optional[Tensor], ignore_index: Optional[int],
                         tangent: Tensor) -> Tuple[Tensor, Tensor]:
    """Forward-mode derivatives (jvp) of (log_prob (R, S), entropy (R,)) for a
    tangent t of the logits: d log p_s = t_{a_s} - <p, t>,
    dH = -<p (log p + H), t>, with the conventions of grad_in_torch_ops."""
    acc, _, p, ls0, H = _softmax_parts(x)
    t = tangent.to(acc)
    d_ent = -(p * (ls0 + H) * t).sum(-1)
    if actions is None:
        return t.new_zeros((x.shape[0], 0)), d_ent
    zero = torch.zeros((), dtype=acc, device=x.device)
    pt = (p * t).sum(-1, keepdim=True)
    if ignore_index is None:
        return t.gather(1, actions) - pt, d_ent
    keep = actions != ignore_index
    d_lp = torch.where(keep, t.gather(1, torch.where(keep, actions, 0)) - pt, zero)
    if actions.shape[1]:
        d_ent = torch.where(keep.any(1), d_ent, zero)
    return d_lp, d_ent


def refuse_double_backward(what: str, where: str = "across a process group; compute them on one process") -> None:
    """For routes whose backward has no differentiable form (process groups,
    the head's truncated blocks)."""
    if creating_graph():
        raise NotImplementedError(
            f"{what}: second derivatives (backward with create_graph=True) are not supported {where}")


@torch.library.custom_op("pgest::log_prob", mutates_args=())
def log_prob_op(logits: Tensor, actions: Optional[Tensor],
                  ignore_index: Optional[int]) -> Tuple[Tensor, Tensor, Tensor]:
    """(R, K) logits, (R, S) integer actions (or None: entropy only) ->
    (log_prob (R, S), entropy (R,), stats (2, R) = [row max, log Z])."""
    check_rows(logits, actions)
    lp, ent, st, _ = forward_rows(logits, index_tensor(actions, logits.shape[1]), ignore_index)
    return lp, ent, st


@log_prob_op.register_fake
def _(logits, actions, ignore_index):
    check_rows(logits, actions)
    R = logits.shape[0]
    S = 0 if actions is None else actions.shape[1]
    acc = _checks.stats_dtype(logits.dtype)
    return logits.new_empty((R, S), dtype=acc), logits.new_empty((R,), dtype=acc), logits.new_empty((2, R), dtype=acc)


@torch.library.custom_op("pgest::log_prob_backward", mutates_args=())
def log_prob_backward_op(grad_log_prob: Optional[Tensor], grad_entropy: Optional[Tensor], logits: Tensor,
                      actions: Optional[Tensor], stats: Tensor, entropy: Tensor, ignore_index: Optional[int]) -> Tensor:
    """d L / d logits for upstream gradients of log_prob (R, S) and entropy (R,)
    (either may be None): one read of the logits, every entry written once."""
    check_rows(logits, actions)
    check_stats(logits, stats, entropy)
    check_upstream(logits, actions, grad_log_prob, grad_entropy)
    return backward_rows(logits, index_tensor(actions, logits.shape[1]), ignore_index, stats, entropy,
                         grad_log_prob=grad_log_prob, grad_entropy=grad_entropy)


@log_prob_backward_op.register_fake
def _(grad_log_prob, grad_entropy, logits, actions, stats, entropy, ignore_index):
    return logits.new_empty(tuple(logits.shape))


def _setup_context(ctx, inputs, output):
    logits, actions, ignore_index = inputs
    _, entropy, stats = output
    ctx.save_for_backward(logits, actions, stats, entropy)
    ctx.ignore_index = ignore_index
    ctx.mark_non_differentiable(stats)


def _backward(ctx, grad_lp, grad_ent, _grad_stats):
    logits, actions, stats, entropy = ctx.saved_tensors
    if creating_graph():
        return grad_in_torch_ops(logits, index_tensor(actions, logits.shape[1]), ctx.ignore_index, grad_lp,
                                 grad_ent), None, None
    grad = log_prob_backward_op(grad_lp, grad_ent, logits, actions, stats, entropy, ctx.ignore_index)
    return grad, None, None


log_prob_op.register_autograd(_backward, setup_context=_setup_context)


register_rows(log_prob_op, (ROWS, ROWS, None), (ROWS, ROWS, STATS))


register_rows(log_prob_backward_op, (ROWS, ROWS, ROWS, ROWS, STATS, ROWS, None), (ROWS,))


class _FuncLogProb(torch.autograd.Function):
    """The route under torch.func transforms, which take autograd.Functions
    only in this form (no ctx in forward, a vmap rule): the forward is the
    registered op (its vmap rule folds a vmapped batch into the rows), the
    backward the same gradient in torch ops, which every transform (nested
    ones too) goes through."""

    generate_vmap_rule = True

    @staticmethod
    def forward(logits, actions, ignore_index):
        lp, ent, _ = log_prob_op(logits, actions, ignore_index)
        return lp, ent

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits, actions, ignore_index = inputs
        ctx.save_for_backward(logits, actions)
        ctx.save_for_forward(logits, actions)
        ctx.ignore_index = ignore_index

    @staticmethod
    def backward(ctx, grad_lp, grad_ent):
        logits, actions = ctx.saved_tensors
        return grad_in_torch_ops(logits, actions, ctx.ignore_index, grad_lp, grad_ent), None, None

    @staticmethod
    def jvp(ctx, tangent, _t_actions, _t_ignore_index):
        logits, actions = ctx.saved_tensors
        return tangent_in_torch_ops(logits, actions, ctx.ignore_index, tangent)


class _LogProbFn(torch.autograd.Function):
    """The eager route. Only the logits are an input of apply(): the rest
    rides in ``aux`` (actions, ignore_index, shapes, stats, entropy, outputs),
    which autograd does not inspect; every tensor input costs microseconds of
    edge bookkeeping at each call, and none of these is differentiable."""

    @staticmethod
    def forward(ctx, logits, aux):
        actions, ignore_index, shapes, stats, entropy, outputs = aux
        if outputs is not None:  # (log_prob, entropy) already computed by the draw of these actions
            (lp, ent), st = outputs, stats
        else:
            lp, ent, st, _ = forward_rows(logits, actions, ignore_index, shapes=shapes, stats=stats,
                                          entropy=entropy, fresh_stats=False)
        # Saved tensors are version-checked whether inputs or not: actions
        # changed in place before backward raise there.
        ctx.save_for_backward(logits, actions, st, ent)
        ctx.ignore_index = ignore_index
        ctx.set_materialize_grads(False)  # an unused output costs nothing in backward
        return lp, ent

    @staticmethod
    def backward(ctx, grad_lp, grad_ent):
        logits, actions, st, ent = ctx.saved_tensors
        if grad_lp is None and grad_ent is None:
            return None, None
        if creating_graph():
            return grad_in_torch_ops(logits, actions, ctx.ignore_index, grad_lp, grad_ent), None
        if batched_upstream(grad_lp, grad_ent):  # the registered op has the vmap rule
            R = logits.shape[0]
            S = 0 if actions is None else actions.shape[1]
            return log_prob_backward_op(None if grad_lp is None else grad_lp.reshape(R, S),
                                     None if grad_ent is None else grad_ent.reshape(R), logits, actions, st,
                                     ent.reshape(R), ctx.ignore_index), None
        grad = backward_rows(logits, actions, ctx.ignore_index, st, ent, grad_log_prob=grad_lp,
                             grad_entropy=grad_ent)
        return grad, None


_apply_log_prob = fast_apply(_LogProbFn)


_transforms_active = torch._C._are_functorch_transforms_active
_legacy_batched = torch._C._functorch.is_legacy_batchedtensor


def batched_upstream(g1: Optional[Tensor], g2: Optional[Tensor] = None) -> bool:
    """Whether a backward's upstream gradients are vmapped (torch.func.vmap,
    or the legacy vmap of gradcheck's batched gradients): the kernels cannot
    read those, the registered backward ops' vmap rules can. Called at every
    eager backward: bound C functions, no generator."""
    return (_transforms_active() or (g1 is not None and _legacy_batched(g1))
            or (g2 is not None and _legacy_batched(g2)))


def rows_pair(x: Tensor, actions: Optional[Tensor], ignore_index: Optional[int], shapes,
              given: Optional[Tuple[Tensor, Tensor]] = None,
              outputs: Optional[Tuple[Tensor, Tensor]] = None) -> Tuple[Tensor, Tensor]:
    """(R, K) logits and (R, S) int64 actions (or None) -> differentiable
    (log_prob, entropy) of ``shapes`` (the caller's), by the cheapest route.
    ``given``: (stats, entropy) of these logits from a draw (pgest::sample):
    the forward then reads only the chosen entries, not the rows.
    ``outputs``: with ``given``, the draw's own (log_prob, entropy) of exactly
    these actions, fresh tensors of ``shapes`` that become the results: no
    forward pass at all."""
    if functorch_active():
        lp, ent = _FuncLogProb.apply(x, actions, ignore_index)
        return lp.view(shapes[0]), ent.view(shapes[1])
    if torch.compiler.is_compiling():
        lp, ent, _ = log_prob_op(x, actions, ignore_index)
        return lp.view(shapes[0]), ent.view(shapes[1])
    stats, entropy = given if given is not None else (None, None)
    if x.requires_grad and torch.is_grad_enabled():
        return _apply_log_prob(x, (actions, ignore_index, shapes, stats, entropy, outputs))
    if outputs is not None:
        return outputs
    lp, ent, _, _ = forward_rows(x, actions, ignore_index, shapes=shapes, stats=stats, entropy=entropy)
    return lp, ent


def rows_of(logits: Tensor) -> Tensor:
    """(..., K) -> (R, K), a view whenever the leading dimensions allow one."""
    if logits.dim() == 2:
        return logits
    return logits.reshape(logits.shape[:-1].numel(), logits.shape[-1])  # not -1: K may be 0 (an empty shard)
