"""Truncated sampling distributions: temperature, top-k, top-p, min-p and
greedy, as one kept set per row that the sampler and the trainer share.

The kept set of a row is ``z >= threshold`` on the tempered logits
``z = logits / temperature`` (csrc/include/pgest/truncation.h has the
definitions and the selection that finds the threshold without sorting the
row). :func:`pgest.sample` draws from softmax over the kept set;
:func:`pgest.log_prob` scores under the same renormalised distribution,
recomputing the set from the same parameters (bit for bit the sampler's on the
same logits), replaying the sampler's record (``threshold=record.cut``, which
survives logits that differ by rounding), or taking an outside sampler's kept
token ids (``kept_tokens``, the compressed layout vLLM's mask replay uses).

The filters apply in transformers' order: temperature, then top-k, then top-p
on the top-k distribution, then min-p. min-p compares each probability with
the largest, a ratio the renormalisation does not change, so only top-p
depends on the order: vLLM applies min-p before top-k and top-p, so its top-p
mass is taken over the min-p set, and where min-p removes mass the two keep
different sets.
"""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from ._apply import fast_apply
from ._checks import check_logits, check_tensor, stats_dtype
from .ops.log_prob import (
    backward_rows,
    batched_upstream,
    creating_graph,
    forward_rows,
    functorch_active,
    grad_in_torch_ops,
    rows_of,
    traced,
)
from .ops.truncation import (
    check_actions_kept,
    check_filters_op,
    check_kept_op,
    check_kept_token_values,
    check_kept_tokens_op,
    poison_scale,
    truncation_native,
    truncation_rows,
)


class Truncation(NamedTuple):
    threshold: Tensor  # (...,) smallest kept logit / temperature (greedy rows: the largest logit)
    kept: Tensor       # (...,) int64 number of kept tokens
    kept_mass: Tensor  # (...,) float64 mass of the kept set under softmax(logits / temperature) (greedy: 1)
    cut: Tensor        # (...,) midway between threshold and the largest value left out (-inf: none): replay with it


class Filters(NamedTuple):
    """Per-row parameters as the kernel takes them: (R,) or (1,) tensors."""
    temperature: Tensor  # float64
    top_k: Tensor        # int64
    top_p: Tensor        # float64
    min_p: Tensor        # float64


# One-element parameter tensors by (value, dtype), shared between eager calls:
# the kernels and the routes only read them, and making four fresh ones cost
# about as much as the native pass on a 64 x 100 batch.
_NUMBERS: dict = {}


def _number(value, dtype: torch.dtype) -> Tensor:
    if traced():  # a constant of the graph being traced
        return torch.tensor([value], dtype=dtype, device="cpu")
    key = (value, dtype)
    t = _NUMBERS.get(key)
    if t is None:
        if len(_NUMBERS) >= 256:
            _NUMBERS.clear()
        with torch.inference_mode(False):  # a cached inference tensor could not be saved for backward later
            t = _NUMBERS[key] = torch.tensor([value], dtype=dtype, device="cpu")
    return t


def _param(value, name: str, lead: torch.Size, default, dtype: torch.dtype, low: float, high: float) -> Tensor:
    R = lead.numel()
    if value is None:
        return _number(default, dtype)
    if isinstance(value, Tensor):
        if value.dtype == torch.bool or value.is_complex() or (dtype == torch.int64 and value.is_floating_point()):
            raise TypeError(f"{name} must be {'an integer' if dtype == torch.int64 else 'a real'} tensor, "
                            f"got {value.dtype}")
        if value.dim() == 0 or value.numel() == 1 and value.dim() <= 1:
            t = value.detach().reshape(1)
        elif tuple(value.shape) in (tuple(lead), (R,)):
            t = value.detach().reshape(R)
        else:
            raise ValueError(f"{name} must be a number or a tensor of the rows' shape {tuple(lead)}, got "
                             f"{tuple(value.shape)}")
        t = t.to("cpu", dtype)
    elif isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number or a tensor, got {type(value).__name__}")
    elif dtype == torch.int64 and not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    else:  # a number is checked as one (no tensor to branch on under torch.compile)
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value}")
        if not low <= value <= high:
            raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
        return _number(value, dtype)
    if traced():  # data of the graph: checked where it runs (pgest::truncation, pgest::check_filters)
        return t
    if dtype == torch.float64 and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} must be finite, got {t[~torch.isfinite(t)][0].item()}")
    if bool((t < low).any()) or bool((t > high).any()):
        bad = t[(t < low) | (t > high)][0].item()
        raise ValueError(f"{name} must be in [{low}, {high}], got {bad}")
    return t


def filters(lead: torch.Size, temperature=None, top_k=None, top_p=None, min_p=None) -> Optional[Filters]:
    """The checked per-row parameters, or None when none was given (the plain
    softmax: today's kernels, bit for bit)."""
    if temperature is None and top_k is None and top_p is None and min_p is None:
        return None
    return Filters(_param(temperature, "temperature", lead, 1.0, torch.float64, 0.0, math.inf),
                   _param(top_k, "top_k", lead, 0, torch.int64, 0, math.inf),
                   _param(top_p, "top_p", lead, 1.0, torch.float64, 0.0, 1.0),
                   _param(min_p, "min_p", lead, 0.0, torch.float64, 0.0, 1.0))


def _token_lists(kept_tokens, R: int, device) -> Tuple[Tensor, Tensor]:
    """kept_tokens as (ids, offsets), int64 on the device, their types and
    sizes checked (not their values)."""
    if not isinstance(kept_tokens, (tuple, list)) or len(kept_tokens) != 2:
        raise TypeError("kept_tokens must be a pair (token_ids, row_offsets): the kept ids of all rows, "
                        "concatenated, and the (rows + 1,) offsets where each row's ids begin")
    ids, offsets = kept_tokens
    check_tensor(ids, "kept_tokens[0] (token_ids)")
    check_tensor(offsets, "kept_tokens[1] (row_offsets)")
    if ids.dtype.is_floating_point or ids.dtype == torch.bool or offsets.dtype.is_floating_point or \
            offsets.dtype == torch.bool:
        raise TypeError("kept_tokens must hold integer tensors")
    ids, offsets = ids.reshape(-1).to(device, torch.int64), offsets.reshape(-1).to(device, torch.int64)
    if offsets.numel() != R + 1:
        raise ValueError(f"kept_tokens row_offsets must have rows + 1 = {R + 1} entries, got {offsets.numel()}")
    return ids, offsets


def _rows_of(ids: Tensor, offsets: Tensor, R: int) -> Tensor:
    """The row of each id: how many row ends lie at or before its position
    (in range whatever the offsets hold, so a traced graph indexes safely
    before its check of them runs)."""
    at = torch.arange(ids.numel(), device=ids.device)
    return torch.searchsorted(offsets[1:].contiguous(), at, right=True).clamp_(max=max(R - 1, 0))


def kept_token_ids(kept_tokens, R: int, device) -> Tuple[Tensor, Tensor]:
    """An outside sampler's kept sets, checked except against the vocabulary
    size: (row, token id) int64 of every kept token."""
    ids, offsets = _token_lists(kept_tokens, R, device)
    check_kept_token_values(ids, offsets, None)
    return _rows_of(ids, offsets, R), ids


def kept_token_mask(rows: Tensor, ids: Tensor, R: int, K: int, offset: int = 0) -> Tensor:
    """(R, K) bool: the kept ids in [offset, offset + K) (a vocabulary shard's
    columns), from kept_token_ids."""
    mine = (ids >= offset) & (ids < offset + K)
    mask = torch.zeros(R, K, dtype=torch.bool, device=ids.device)
    mask[rows[mine], ids[mine] - offset] = True
    return mask


def _kept_token_mask(kept_tokens, R: int, K: int, device) -> Tensor:
    """(R, K) bool: the kept token lists checked (ids in [0, K)) and placed.
    Traced, the values are checked by a registered op where the graph runs,
    its result in the mask itself (every logit is masked by it; an empty
    list would leave the op's result unused elsewhere)."""
    ids, offsets = _token_lists(kept_tokens, R, device)
    if not traced():
        check_kept_token_values(ids, offsets, K)
    mask = torch.zeros(R, K, dtype=torch.bool, device=device)
    mask.index_put_((_rows_of(ids, offsets, R), ids.clamp(0, max(K - 1, 0))), torch.ones((), dtype=torch.bool,
                                                                                         device=device))
    if traced():
        mask &= check_kept_tokens_op(ids, offsets, K) == 1
    return mask


def inverse_temperature(f: Filters, rows: int, dtype: torch.dtype, device) -> Tensor:
    """d z / d logits per row: 1 / temperature, 0 on greedy rows (whose z
    does not depend on the logits)."""
    t = f.temperature.to(torch.float64)
    inv = torch.where(t == 0, torch.zeros_like(t), 1.0 / torch.where(t == 0, torch.ones_like(t), t))
    return inv.to(device, dtype, non_blocking=True).expand(rows)


class _KeptLogits(torch.autograd.Function):
    """z = logits / temperature on the kept set, -inf elsewhere, from the
    native pass; the set is a constant, so dz/dx = 1 / temperature there (0
    on greedy rows, whose z does not depend on the logits)."""

    @staticmethod
    def forward(ctx, x, z, inv_temperature):
        ctx.save_for_backward(inv_temperature)
        ctx.dtype = x.dtype
        return z

    @staticmethod
    def backward(ctx, grad_z):
        (inv_t,) = ctx.saved_tensors
        return (grad_z * inv_t[:, None]).to(ctx.dtype), None, None


class _KeptScores(torch.autograd.Function):
    """log_prob and entropy of each row's kept set by the CPU kernels, which
    never form the kept logits: the forward selects (or replays) the set and
    takes its statistics as the sampler does, the backward reads the row
    through the set's view. The bits of the kept logits' route (kept_logits,
    then the log_prob kernels on them); second derivatives and vmapped
    upstream gradients take that route. ``aux`` as in _LogProbFn: (actions,
    ignore_index, filters, replayed threshold, shapes, an outside sampler's
    (ids, offsets) lists)."""

    @staticmethod
    def forward(ctx, x, aux):
        actions, ignore_index, f, given, shapes, lists = aux
        threshold = torch.empty(x.shape[0], dtype=stats_dtype(x.dtype), device=x.device)
        lp, ent, st, _ = forward_rows(x, actions, ignore_index, shapes=shapes, fresh_stats=False,
                                      truncation=(f, given, threshold, lists))
        ctx.save_for_backward(x, actions, st, ent, threshold, *(() if lists is None else lists))
        ctx.filters, ctx.ignore_index = f, ignore_index
        ctx.set_materialize_grads(False)
        return lp, ent

    @staticmethod
    def backward(ctx, grad_lp, grad_ent):
        x, actions, st, ent, threshold, *lists = ctx.saved_tensors
        if grad_lp is None and grad_ent is None:
            return None, None
        f = ctx.filters
        lists = tuple(lists) if lists else None
        if creating_graph() or batched_upstream(grad_lp, grad_ent):
            # differentiable in x through the kept logits (the forward's set, replayed)
            z, _ = kept_logits(x, f, threshold=None if lists else threshold, kept_tokens=lists, with_mass=False)
            R = x.shape[0]
            g = grad_in_torch_ops(z, actions, ctx.ignore_index,
                                  None if grad_lp is None else grad_lp.reshape(R, -1),
                                  None if grad_ent is None else grad_ent.reshape(R))
            return (g * inverse_temperature(f, R, z.dtype, z.device)[:, None]).to(x.dtype), None
        return backward_rows(x, actions, ctx.ignore_index, st, ent, grad_log_prob=grad_lp, grad_entropy=grad_ent,
                             truncation=(f, threshold, None, lists)), None


_apply_kept_scores = fast_apply(_KeptScores)


def kept_scores(x: Tensor, actions: Optional[Tensor], ignore_index: Optional[int], f: Filters,
                threshold: Optional[Tensor], shapes, kept_tokens=None) -> Tuple[Tensor, Tensor]:
    """(R, K) CPU logits -> differentiable (log_prob, entropy) of ``shapes``
    under each row's kept set (selected by ``f``, ``threshold`` replayed, or
    an outside sampler's ``kept_tokens``), in eager mode; an action outside
    its set raises ValueError naming the row. No (R, K) tensor but the
    gradient."""
    R, K = x.shape
    if threshold is not None and kept_tokens is not None:
        raise ValueError("pass threshold or kept_tokens, not both")
    given = None if threshold is None else replayed_threshold(threshold, R, stats_dtype(x.dtype), x.device)
    lists = None
    if kept_tokens is not None:
        ids, offsets = _token_lists(kept_tokens, R, x.device)
        check_kept_token_values(ids, offsets, K)
        lists = (ids.contiguous(), offsets.contiguous())
    if actions is None:
        actions = torch.empty(R, 0, dtype=torch.int64, device=x.device)
    aux = (actions, ignore_index, f, None if given is None else given.contiguous(), shapes, lists)
    if x.requires_grad and torch.is_grad_enabled():
        return _apply_kept_scores(x, aux)
    lp, ent, _, _ = forward_rows(x, actions, ignore_index, shapes=shapes,
                                 truncation=(f, aux[3], torch.empty(R, dtype=stats_dtype(x.dtype), device=x.device),
                                             lists))
    return lp, ent


def replayed_threshold(threshold, rows: int, dtype: torch.dtype, device, what: str = "row") -> Tensor:
    """A ``threshold=`` argument checked (one value per row) and as the
    kernels take it: (rows,) of the accumulation type on the logits' device."""
    check_tensor(threshold, "threshold")
    if threshold.is_complex() or threshold.dtype == torch.bool:
        raise TypeError(f"threshold must be a real tensor, got {threshold.dtype}")
    if threshold.numel() != rows:
        raise ValueError(f"threshold must have one value per {what} ({rows}), got shape {tuple(threshold.shape)}")
    if threshold.device.type == "cpu" and not traced() and bool(torch.isnan(threshold).any()):
        # (elsewhere a NaN keeps nothing: the row's error is that it has no kept entry)
        at = int(torch.isnan(threshold.reshape(-1)).nonzero()[0])
        raise ValueError(f"threshold[{at}] is NaN: a replayed threshold must be a number (-inf keeps every entry)")
    return threshold.detach().reshape(rows).to(device, dtype)


def record_of(threshold, kept, kept_mass, cut, shape) -> Truncation:
    """The record tensors, (rows,) each, as a Truncation of the leading shape."""
    if threshold.shape == shape:  # (rows,) already: four views cost as much as a small batch's draw
        return Truncation(threshold, kept, kept_mass, cut)
    return Truncation(threshold.view(shape), kept.view(shape), None if kept_mass is None else kept_mass.view(shape),
                      cut.view(shape))


def kept_logits(x: Tensor, f: Filters, *, threshold: Optional[Tensor] = None, kept_tokens=None,
                lead: Optional[torch.Size] = None, with_mass: bool = True) -> Tuple[Tensor, Optional[Truncation]]:
    """(R, K) logits -> (R, K) tempered logits with -inf outside the kept set,
    in the accumulation type and differentiable with respect to ``x`` (the set
    is a constant of the step), and the truncation record when the set was
    computed here (None when replayed). ``with_mass=False``: the record's
    kept_mass is None, which spares the CPU kernel the kept set's statistics
    (a trainer's call, which needs only the kept logits)."""
    R, K = x.shape
    acc = stats_dtype(x.dtype)
    dev = x.device
    shape = lead if lead is not None else (R,)
    greedy = f.temperature == 0
    if threshold is not None:
        if kept_tokens is not None:
            raise ValueError("pass threshold or kept_tokens, not both")
        threshold = replayed_threshold(threshold, R, acc, dev)
    if dev.type == "cpu" and kept_tokens is None and not traced():
        # one native pass: the set, its record and z
        *rec, z = truncation_native(x.detach(), *f, with_logits=True, with_mass=with_mass and threshold is None,
                                    given_threshold=None if threshold is None else threshold.contiguous())
        record = None if threshold is not None else record_of(*rec, shape)
        if x.requires_grad and torch.is_grad_enabled():
            z = _KeptLogits.apply(x, z, inverse_temperature(f, R, acc, dev))
        return z, record
    record = None
    if threshold is None and kept_tokens is None:
        rec = truncation_rows(x.detach(), *f)
        record = record_of(*rec, shape)
        threshold = rec[0].to(dev)
    elif traced():  # no pgest::truncation call checks the parameters: this one does, where the graph runs
        # built field by field: torch 2.8's dynamo refuses namedtuple's _replace (and fails on *f[1:])
        f = Filters(f.temperature * check_filters_op(*f), f.top_k, f.top_p, f.min_p)
    # Where the parameters are data of a traced graph, both branches below
    # are taken (x / 1 is x's bits; the greedy rows are selected by value);
    # in eager mode they are read off the parameters, on the CPU: no sync
    tempered = traced() or bool((f.temperature != 1).any())
    any_greedy = traced() or bool(greedy.any())
    t = f.temperature.to(dev, acc, non_blocking=True)  # a host parameter: copied, not waited for
    z = x.to(acc) / torch.where(t == 0, torch.ones_like(t), t)[:, None] if tempered else x.to(acc)
    if kept_tokens is not None:
        z = z.masked_fill(~_kept_token_mask(kept_tokens, R, K, dev), float("-inf"))
    else:  # the row's maximum is always kept, whatever the replayed threshold
        z = z.masked_fill(z < torch.minimum(threshold, z.detach().amax(-1))[:, None], float("-inf"))
    if any_greedy:
        only = torch.full((R, K), float("-inf"), dtype=acc, device=dev)
        only.scatter_(1, x.detach().to(acc).argmax(-1).view(R, 1), 0.0)
        z = torch.where(greedy.to(dev, non_blocking=True).expand(R)[:, None], only, z)
    return native_gradient(x, z, f), record


def native_gradient(x: Tensor, z: Tensor, f: Filters) -> Tensor:
    """z, kept logits formed from x by torch ops, with the native route's
    gradient bit for bit (grad * (1 / T), not autograd's grad / T), on every
    device, over vocabulary shards and under torch.compile (torch.func keeps
    the torch ops)."""
    if x.requires_grad and torch.is_grad_enabled() and not functorch_active():
        return _KeptLogits.apply(x, z.detach(), inverse_temperature(f, x.shape[0], z.dtype, z.device))
    return z


def check_kept(z: Tensor, actions: Tensor, ignore_index: Optional[int], lead) -> Optional[Tensor]:
    """An action outside the kept set has no probability: an error naming the
    row. Where the check is deferred (CUDA) or traced (a registered op that
    runs with the graph), an (R,) scale for the row's outputs: 1, NaN on a
    row to poison; None where the check ran here."""
    if traced():
        return check_kept_op(z.detach(), actions.reshape(z.shape[0], -1), ignore_index)
    bad = check_actions_kept(z, actions, ignore_index, lead)
    return None if bad is None else poison_scale(bad, z.shape[0], z)


def scaled(t: Tensor, scale: Optional[Tensor], lead) -> Tensor:
    """t (the leading shape, then per-row dimensions) times check_kept's scale."""
    if scale is None:
        return t
    return t * scale.to(t.dtype).reshape(tuple(lead) + (1,) * (t.dim() - len(lead)))


def truncation(logits: Tensor, *, temperature=None, top_k=None, top_p=None, min_p=None) -> Truncation:
    """The kept set of each row under temperature, top-k, top-p and min-p
    (what :func:`pgest.sample` reports with its draws), without sampling.

    Args:
        logits: (..., K) float32/float64/float16/bfloat16; leading dimensions are rows.
        temperature: >= 0; 0 is greedy (the first maximum alone). Default 1.
        top_k: keep the tokens whose logit is >= the k-th largest (ties
            kept); 0 or None: off.
        top_p: in [0, 1]; keep the tokens whose strictly more probable kept
            tokens hold less than top_p of the top-k distribution's mass; 1
            or None: off.
        min_p: in [0, 1]; keep the tokens with p >= min_p * p_max; 0 or None: off.

        Each is a Python number or a tensor with one value per row (a batch
        of requests with different settings).

    Returns:
        ``Truncation(threshold, kept, kept_mass, cut)`` of the leading shape:
        the smallest kept ``logits / temperature`` (the largest logit for
        greedy rows), the number of kept tokens, the kept mass of the full
        ``softmax(logits / temperature)`` (float64; 1 for greedy rows), and
        ``cut``, midway between ``threshold`` and the largest value left out
        (-inf when nothing is): pass it as ``threshold=`` to replay the set
        on logits that differ by rounding (a cached and a full forward of a
        model); ``threshold`` itself replays it only on the same logits.
    """
    check_logits(logits)
    lead = logits.shape[:-1]
    f = filters(lead, temperature, top_k, top_p, min_p) or filters(lead, 1.0)
    return record_of(*truncation_rows(rows_of(logits.detach()), *f), lead)
