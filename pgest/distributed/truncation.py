"""The kept set of truncated sampling (pgest/truncation.py) when the
vocabulary is split over a process group (vocab_parallel.py's layout). Every
rank ends with the same threshold per row, from collectives of O(rows)
values plus the candidates near each boundary, never the vocabulary:

- the global max (all_reduce MAX) and the rows' live counts (integer sums);
- top-k: each rank's k largest values, all-gathered; the k-th largest of them
  is the global k-th largest;
- top-p: each rank's m largest kept values with their masses, all-gathered
  and merged; the boundary is exact when every value at or above it and one
  value below it lie above the largest value some rank left out of its list,
  else m grows eightfold (every rank takes that decision from the same
  gathered numbers);
- min-p: max + log(min_p).

Float sums cross ranks as all-gathers added in rank order, so every rank holds
the same bits. The masses are float64 exponentials here (the single-process
kernel uses its float32 ones), so a kept set can differ from a single
process's only where a cumulative mass is within rounding of top_p. With the
same set, the scores are a single process's bits: the kept logits go through
vocab_parallel's exact pass, and their gradient is scaled by 1 / T as the
kernel scales it (truncation.native_gradient).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .._checks import stats_dtype
from ..ops.truncation import mass_strictly_above, midway_cut
from ..truncation import Filters, Truncation, kept_token_mask, native_gradient
from .vocab_parallel import Layout, dist_module, exchange, raise_if_failed

NEG = float("-inf")


def _gather_cat(t: Tensor, group, world: int, dim: int) -> Tensor:
    got = [torch.empty_like(t) for _ in range(world)]
    dist_module().all_gather(got, t.contiguous(), group=group)
    return torch.cat(got, dim)


def _sum_in_rank_order(t: Tensor, group, world: int) -> Tensor:
    got = [torch.empty_like(t) for _ in range(world)]
    dist_module().all_gather(got, t.contiguous(), group=group)
    total = got[0].clone()
    for g in got[1:]:
        total += g
    return total


def _reduce(t: Tensor, op, group) -> Tensor:
    t = t.clone()
    dist_module().all_reduce(t, op=op, group=group)
    return t


def _top_p_cut(z: Tensor, M: Tensor, target: Tensor, rows: Tensor, layout: Layout, group) -> Tensor:
    """The smallest kept value of top-p per row (z: this rank's kept-so-far
    values, -inf elsewhere); -inf where ``rows`` is False."""
    R, Vr = z.shape
    world = layout.world
    largest = max(layout.sizes)
    m = 256
    while True:
        mm = min(m, Vr)
        local = z.topk(mm, -1).values if mm else z.new_empty((R, 0))
        pad = torch.full((R, m - mm), NEG, dtype=z.dtype, device=z.device)
        listed = torch.cat([local, pad], 1)
        # the largest value a rank may have left out: its m-th, when its list is full
        left_out = torch.where(torch.tensor(mm == m and Vr > m, device=z.device), listed[:, -1],
                               torch.full((R,), NEG, dtype=z.dtype, device=z.device))
        allv = _gather_cat(listed, group, world, 1)
        cut_out = _gather_cat(left_out[:, None], group, world, 1).amax(1)
        v, _ = torch.sort(allv, -1, descending=True)
        mass = torch.where(v > NEG, torch.exp(v.double() - M.double()[:, None]), 0.0)
        kept = (mass_strictly_above(v, mass) < target[:, None]) & (v > NEG)
        kept |= v == M[:, None]
        tau = torch.where(kept, v, torch.full_like(v, float("inf"))).amin(1)
        dropped = torch.where(~kept & (v > NEG), v, torch.full_like(v, NEG)).amax(1)
        exact = (cut_out == NEG) | ((tau > cut_out) & (dropped > cut_out))
        if bool((exact | ~rows).all()) or m >= largest:
            return torch.where(rows, tau, torch.full_like(tau, NEG))
        m *= 8


def kept_shard(x: Tensor, f: Filters, group, *, threshold: Optional[Tensor] = None,
               kept_tokens: Optional[Tuple[Tensor, Tensor]] = None,
               error: Optional[BaseException] = None) -> Tuple[Tensor, Optional[Truncation], Layout]:
    """This rank's (R, V_r) shard of logits -> its tempered values with -inf
    outside the global kept set (differentiable with respect to ``x``), the
    record (None when the set is replayed: ``threshold``, or ``kept_tokens``
    as (row, global id) pairs from truncation.kept_token_ids) and the layout.
    Raises on every rank if any rank's input failed."""
    dist = dist_module()
    layout, _ = exchange(x, group, error)
    if kept_tokens is not None:
        ids = kept_tokens[1]
        over = int(ids.max()) if ids.numel() and int(ids.max()) >= layout.total else -1
        flags = _gather_cat(torch.tensor([over >= 0], dtype=torch.int64, device=x.device), group, layout.world, 0)
        raise_if_failed(flags.cpu(), layout.rank, None if over < 0 else IndexError(
            f"kept_tokens token ids must be in [0, {layout.total}), got {over}"))
    R, Vr = x.shape
    acc = stats_dtype(x.dtype)
    dev = x.device
    world = layout.world
    t = f.temperature.to(dev, acc).expand(R)
    greedy = t == 0
    z = x.to(acc) / torch.where(greedy, torch.ones_like(t), t)[:, None]
    zd = z.detach()
    bad = torch.isnan(zd) | (zd == float("inf"))
    flags = _gather_cat(bad.any().to(torch.int64).view(1), group, world, 0)
    local_error = None
    if bool(bad.any()):
        row, col = bad.nonzero()[0].tolist()
        local_error = ValueError(f"logits[{row}, {col + layout.offset}] / temperature is {zd[row, col].item()}: "
                                 "scores must be finite or -inf (this rank's vocabulary shard; the column is global)")
    raise_if_failed(flags.cpu(), layout.rank, local_error)
    local_max = zd.amax(-1) if Vr else torch.full((R,), NEG, dtype=acc, device=dev)
    M = _reduce(local_max, dist.ReduceOp.MAX, group)
    if bool((M == NEG).any()):
        raise ValueError(f"logits[{int((M == NEG).nonzero()[0])}] is all -inf over the vocabulary: no action has "
                         "positive probability")
    finite = zd > NEG
    if kept_tokens is not None:
        cut = None
    elif threshold is not None:  # the row's maximum is always kept, whatever the replayed threshold
        cut = torch.minimum(threshold.to(dev, acc).reshape(R), M)
    else:
        # the masses and counts a selection and its record need (a replayed
        # set needs neither: no exponential pass, no collective for them)
        live = _reduce(finite.sum(-1), dist.ReduceOp.SUM, group)
        e_all = torch.where(finite, torch.exp(zd.double() - M.double()[:, None]), 0.0)
        Z = _sum_in_rank_order(e_all.sum(-1), group, world)
        cut = torch.full((R,), NEG, dtype=acc, device=dev)
        k = f.top_k.to(dev).expand(R)
        by_k = (k > 0) & (k < live)
        if bool(by_k.any()):
            kmax = int(k[by_k].max())
            kk = min(kmax, Vr)
            local = zd.topk(kk, -1).values if kk else zd.new_empty((R, 0))
            listed = torch.cat([local, torch.full((R, kmax - kk), NEG, dtype=acc, device=dev)], 1)
            allv, _ = torch.sort(_gather_cat(listed, group, world, 1), -1, descending=True)
            kth = allv.gather(1, (k.clamp(1, kmax) - 1)[:, None]).squeeze(1)
            cut = torch.where(by_k, kth, cut)
        p = f.top_p.to(dev).expand(R)
        by_p = p < 1
        if bool(by_p.any()):
            in_k = zd >= cut[:, None]
            Zk = _sum_in_rank_order(torch.where(in_k, e_all, 0.0).sum(-1), group, world)
            target = p.double() * Zk
            tau = _top_p_cut(torch.where(in_k, zd, torch.full_like(zd, NEG)), M, target, by_p, layout, group)
            cut = torch.maximum(cut, tau.to(acc))
        mp = f.min_p.to(dev).expand(R)
        by_m = mp > 0
        if bool(by_m.any()):
            cm = (M.double() + torch.log(torch.where(by_m, mp.double(), torch.ones_like(mp.double())))).to(acc)
            cut = torch.where(by_m, torch.maximum(cut, cm), cut)
    if cut is None:
        keep = kept_token_mask(*kept_tokens, R, Vr, layout.offset) & finite
    else:
        keep = (zd >= cut[:, None]) & finite
    if bool(greedy.any()):
        # the first maximum over the whole vocabulary: the lowest global id
        cols = torch.arange(Vr, device=dev) + layout.offset
        first = torch.where(zd == M[:, None], cols.expand(R, Vr), torch.full((R, Vr), 2**62, device=dev))
        winner = _reduce(first.amin(-1) if Vr else torch.full((R,), 2**62, device=dev), dist.ReduceOp.MIN, group)
        mine = cols.expand(R, Vr) == winner[:, None]
        keep = torch.where(greedy[:, None], mine, keep)
        z = torch.where(greedy[:, None], torch.zeros_like(z), z)
    z = native_gradient(x, z.masked_fill(~keep, NEG), f)
    if threshold is not None or kept_tokens is not None:
        return z, None, layout
    kept = _reduce(keep.sum(-1), dist.ReduceOp.SUM, group)
    smallest = _reduce(torch.where(keep, zd, torch.full_like(zd, float("inf"))).amin(-1) if Vr else
                       torch.full((R,), float("inf"), dtype=acc, device=dev), dist.ReduceOp.MIN, group)
    mass = _sum_in_rank_order(torch.where(keep, e_all, 0.0).sum(-1), group, world) / Z
    left_out = torch.where(~keep & finite, zd, torch.full_like(zd, NEG)).amax(-1) if Vr else \
        torch.full((R,), NEG, dtype=acc, device=dev)
    dropped = _reduce(left_out, dist.ReduceOp.MAX, group)
    cut = midway_cut(smallest, dropped)
    smallest = torch.where(greedy, M, smallest)
    cut = torch.where(greedy, M, cut)
    mass = torch.where(greedy, torch.ones_like(mass), mass)
    return z, Truncation(smallest, kept, mass, cut), layout


def check_kept_shard(z: Tensor, actions: Tensor, ignore_index: Optional[int], layout: Layout, group) -> None:
    """An action outside its row's kept set raises on every rank; its owner
    names the row."""
    R, Vr = z.shape
    a = actions.reshape(R, -1)
    own = (a >= layout.offset) & (a < layout.offset + Vr)
    if ignore_index is not None:
        own &= a != ignore_index
    local = torch.where(own, a - layout.offset, torch.zeros_like(a))
    at = z.detach().gather(1, local) if Vr else torch.zeros_like(a, dtype=z.dtype)
    bad = own & (at == NEG)
    flags = _gather_cat(bad.any().to(torch.int64).view(1), group, layout.world, 0)
    error = None
    if bool(bad.any()):
        row, col = bad.nonzero()[0].tolist()
        which = f"{row}, {col}" if a.shape[1] > 1 else f"{row}"
        error = ValueError(f"actions[{which}] = {int(a[row, col])} is outside the kept set of its row (truncated by "
                           "temperature / top_k / top_p / min_p): it has no probability")
    raise_if_failed(flags.cpu(), layout.rank, error)
