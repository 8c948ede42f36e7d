"""Truncated sampling and scoring in the fused head: linear_sample and
linear_log_prob with temperature (a number or one per token), top_k, top_p,
min_p or a replayed threshold (pgest/truncation.py has the definitions).

The kept set of a token needs its whole row of logits, so this route builds
the logits one block of tokens at a time, over the whole vocabulary, in one
reused buffer (block_tokens says how many tokens; on the GPU and over a
process group the trainer's kept logits of a block are a second block-sized
tensor, on the CPU the kernels take the kept set without them). Each block goes through the same
native row pass as ``pgest.sample`` and ``pgest.log_prob`` (tempered,
truncated and drawn from, or scored, in one read), so the head's sampler and
trainer agree bit for bit, and the draws are those of ``pgest.sample`` on the
block's logits for the same generator state (the same Philox uniforms of the
same global rows).

With a process group (a ``Shard`` of the vocabulary), each rank builds its
shard's columns of a block; the kept set comes from
pgest/distributed/truncation.py's collectives and the draws and scores from
the untruncated group route's (vocab_parallel.py), so every rank holds the
same numbers: on the CPU one process's bits wherever the group's float64
masses find one process's kept sets (distributed/truncation.py).
"""
import math
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .. import _checks, device_errors
from .._vmap import register_per_element, register_refusal
from ..distributed.piece_tree import PieceTree, tree_total
from ..ops.log_prob import backward_rows, forward_rows, refuse_double_backward
from ..ops.sample import sample_native
from ..ops.truncation import empty_record
from ..philox import uniforms as philox_uniforms
from ..truncation import Filters, Truncation, check_kept, inverse_temperature, kept_logits
from .split_pieces import SplitPieces
from .tiles import PIECE, ROW_MULTIPLE, logits_dtype, logits_tile, mm_rows, soft_cap_grad_, weight_scratch

BLOCK_SHARE = 40  # a block of tokens holds at least 1/40 of the tokens
BLOCK_LOGITS = 2**23  # and, at the default tiles, at least 8 Mi logits (32 MiB in float32)


def block_budget(token_tile: Optional[int], vocab_tile: Optional[int], tn: int, tv: int) -> int:
    """Logits a block may hold: token_tile x vocab_tile as the caller gave
    them, and at least BLOCK_LOGITS when both are the defaults. Every block
    rereads the whole head weight (and converts a 16-bit one to float32), and
    a product of a few rows runs far below the matmul's rate: blocks of 64
    tokens made top-p in the head 2.5x (fp32) and 3.2x (bf16) the untruncated
    head at 1024 tokens, H 1024, V 32000; blocks of 260 (this budget) 1.1x
    (bench/bench_truncation.py, the AMD machine)."""
    return tn * tv if token_tile is not None or vocab_tile is not None else max(tn * tv, BLOCK_LOGITS)


def block_tokens(N: int, V: int, budget: int) -> int:
    """Tokens per block: as many as ``budget`` logits hold, or 1/BLOCK_SHARE
    of the tokens when that is more (a decode step of 64 sequences in
    blocks of a few tokens would reread the weight for each)."""
    tb = max(1, min(N, max(math.ceil(N / BLOCK_SHARE), budget // max(V, 1))))
    # a multiple of ROW_MULTIPLE: a block's last few rows would cost a padded
    # product of the whole weight of their own (tiles.products)
    return tb if tb == N or tb < ROW_MULTIPLE else tb - tb % ROW_MULTIPLE


def _rows(f: Filters, r0: int, r1: int) -> Filters:
    return Filters(*(t if t.numel() == 1 else t[r0:r1] for t in f))


def _block_logits(h: Tensor, w: Tensor, b: Optional[Tensor], buffer: Tuple[Tensor, Optional[Tensor]],
                  softcap: float) -> Tensor:
    """hidden @ weight.T + bias for a block of tokens, soft-capped, in the
    head's logits dtype (float32 for 16-bit inputs), not yet tempered,
    written into the one block buffer a call reuses."""
    out, scratch = buffer
    return logits_tile(h, w, b, 0, w.shape[0], 1.0, out=out[:h.shape[0]], scratch=scratch, softcap=softcap)


def _buffer(h2: Tensor, w: Tensor, tb: int) -> Tuple[Tensor, Optional[Tensor]]:
    """A call's block of logits and its 16-bit weight's conversion buffer."""
    return (torch.empty((min(tb, h2.shape[0]), w.shape[0]), dtype=logits_dtype(h2.dtype), device=h2.device),
            weight_scratch(w))


def _block_size(N: int, w: Tensor, budget: int, shard) -> int:
    """block_tokens; over a process group (``shard``) for the whole
    vocabulary, and the smallest of the ranks' (every rank must run the same
    blocks, whatever tiles each was given)."""
    if shard is None:
        return block_tokens(N, w.shape[0], budget)
    from ..distributed.vocab_parallel import dist_module

    t = torch.tensor([block_tokens(N, shard.total, budget)], dtype=torch.int64, device=w.device)
    dist_module().all_reduce(t, op=dist_module().ReduceOp.MIN, group=shard.group)
    return int(t)


def sample_tokens(h2: Tensor, w: Tensor, b: Optional[Tensor], f: Filters, S: int, seed: int,
                  budget: int, shard=None, softcap: float = 0.0) -> Tuple[Tensor, Tensor, Tensor, Truncation]:
    """(N, H) tokens -> actions (N, S), log_prob (N, S), entropy (N,) and the
    truncation record (N,) of the tokens' kept sets. ``shard``: ``w`` and
    ``b`` are this rank's rows of a vocabulary split over ``shard.group``
    (every rank gets the same numbers, those of the whole head)."""
    N, dev = h2.shape[0], h2.device
    acc = _checks.stats_dtype(h2.dtype)
    actions = torch.empty((N, S), dtype=torch.int64, device=dev)
    lp = torch.empty((N, S), dtype=acc, device=dev)
    ent = torch.empty((N,), dtype=acc, device=dev)
    record = empty_record(N, acc, dev)
    u = philox_uniforms(N, S, seed).to(dev)
    tb = _block_size(N, w, budget, shard)
    buffer = _buffer(h2, w, tb)
    with torch.no_grad():
        for r0 in range(0, N, tb):
            r1 = min(N, r0 + tb)
            x = _block_logits(h2[r0:r1], w, b, buffer, softcap)
            fb = _rows(f, r0, r1)
            if shard is not None:
                from ..distributed.truncation import kept_shard
                from ..distributed.vocab_parallel import draw_shard

                z, rec, layout = kept_shard(x, fb, shard.group)
                out = draw_shard(z, u[r0:r1], layout, shard.group)
                for dst, src in zip(record, rec):
                    dst[r0:r1] = src
            elif x.device.type == "cpu":
                rec = tuple(t[r0:r1] for t in record)
                out = sample_native(x, S, 0, uniforms=u[r0:r1].contiguous(), truncation=(*fb, rec))
            else:
                z, rec = kept_logits(x, fb)
                out = sample_native(z, S, 0, uniforms=u[r0:r1].contiguous())
                for dst, src in zip(record, rec):
                    dst[r0:r1] = src
            actions[r0:r1], lp[r0:r1], ent[r0:r1] = out[0], out[1], out[2]
    return actions, lp, ent, Truncation(*record)


def _scored_natively(x: Tensor, shard) -> bool:
    """Whether a block's kept sets are taken by the log_prob kernels
    themselves (CPU, one process, checks not deferred): no kept logits formed."""
    return shard is None and x.device.type == "cpu" and not device_errors.defers(x)


def _kept(x: Tensor, f: Filters, threshold: Optional[Tensor], shard) -> Tuple[Tensor, Optional[Truncation]]:
    """A block's kept logits (and record unless ``threshold`` is replayed),
    over the whole vocabulary of a process group with ``shard``."""
    if shard is None:
        return kept_logits(x, f, threshold=threshold, with_mass=False)  # the record's threshold is what is kept
    from ..distributed.truncation import kept_shard

    z, rec, _ = kept_shard(x, f, shard.group, threshold=threshold)
    return z, rec


def truncated_forward(h2: Tensor, w: Tensor, b: Optional[Tensor], actions: Tensor, ignore_index: Optional[int],
                      f: Filters, threshold: Optional[Tensor], tb: int, shard=None, softcap: float = 0.0):
    """(N, H) tokens, in blocks of ``tb`` (_block_size) -> log_prob (N, S),
    entropy (N,), stats (2, N) = [max, log Z] of the kept sets, and found
    (N,): each token's smallest kept z (the set the backward takes again)."""
    N = h2.shape[0]
    acc = _checks.stats_dtype(h2.dtype)
    dev = h2.device
    S = actions.shape[1]
    lp = torch.empty((N, S), dtype=acc, device=dev)
    ent = torch.empty((N,), dtype=acc, device=dev)
    stats = torch.empty((2, N), dtype=acc, device=dev)
    found = torch.empty((N,), dtype=acc, device=dev)
    buffer = _buffer(h2, w, tb)
    for r0 in range(0, N, tb):
        r1 = min(N, r0 + tb)
        x = _block_logits(h2[r0:r1].detach(), w.detach(), None if b is None else b.detach(), buffer, softcap)
        given = None if threshold is None else threshold[r0:r1]
        a = actions[r0:r1]
        if _scored_natively(x, shard):  # the kept set taken by the kernels: no kept logits
            lp[r0:r1], ent[r0:r1], stats[:, r0:r1], _ = forward_rows(
                x, a, ignore_index, truncation=(_rows(f, r0, r1), given, found[r0:r1]))
            continue
        z, rec = _kept(x, _rows(f, r0, r1), given, shard)
        if shard is None:
            scale = check_kept(z, a, ignore_index, None)  # deferred on CUDA: the rows poisoned
            lp[r0:r1], ent[r0:r1], stats[:, r0:r1], _ = forward_rows(z, a, ignore_index)
            if scale is not None:
                lp[r0:r1] *= scale[:, None].to(lp.dtype)
                ent[r0:r1] *= scale.to(ent.dtype)
        else:
            from ..distributed.truncation import check_kept_shard
            from ..distributed.vocab_parallel import forward as shard_forward

            check_kept_shard(z, a, ignore_index, shard.layout, shard.group)
            lp[r0:r1], ent[r0:r1], st, _ = shard_forward(z, a, ignore_index, shard.group)
            stats[:, r0:r1] = st[:2]
        found[r0:r1] = rec.threshold if rec is not None else given
    return lp, ent, stats, found


def _hidden_grad(g: Tensor, w: Tensor, split: Optional[SplitPieces], reduce_hidden: bool, dtype,
                 pool: List[Tensor]) -> Tensor:
    """A block's hidden gradient from its logits' gradient ``g`` (in the
    weight's dtype): the products of the vocabulary's pieces, summed in the
    piece tree (the bits of one process whatever the group: piece_tree.py),
    a token's rows their own bits (tiles.mm_rows). ``split``: this rank's
    pieces of a group's vocabulary; without ``reduce_hidden`` its share."""
    if split is None:
        tree = PieceTree(0, pool)
        for v0 in range(0, w.shape[0], PIECE):
            tree.add(mm_rows(g[:, v0:v0 + PIECE].contiguous(), w[v0:v0 + PIECE]))
        return tree_total(tree.nodes(), tree.next).to(dtype)
    tree = split.hidden_tree(g, pool)
    if not reduce_hidden:
        return tree.share().to(dtype) if tree.stack else g.new_zeros((g.shape[0], w.shape[1]), dtype=dtype)
    return split.group_total(tree, g.shape[0], dtype)


def truncated_backward(grad_lp: Optional[Tensor], grad_ent: Optional[Tensor], h2: Tensor, w: Tensor,
                       b: Optional[Tensor], actions: Tensor, stats: Tensor, ent: Tensor, found: Tensor,
                       ignore_index: Optional[int], f: Filters, tb: int, needs, shard=None,
                       reduce_hidden: bool = True, softcap: float = 0.0):
    """The gradients of hidden, weight and bias (None where ``needs`` says
    no): each block's logits again, their gradient through the kept sets
    the forward found, then the products (no differentiable form: the
    autograd formulas refuse create_graph=True before calling it)."""
    N = h2.shape[0]
    acc = _checks.stats_dtype(h2.dtype)
    need_h, need_w, need_b = needs[0], needs[1], b is not None and needs[2]
    gh = torch.zeros_like(h2) if need_h else None
    split = None if shard is None or not need_h else SplitPieces(h2, w, b, 1.0, softcap, shard)
    pool: List[Tensor] = []  # the piece trees' float64 buffers, reused over the blocks
    gw = torch.zeros(w.shape, dtype=torch.float64 if w.dtype == torch.float64 else torch.float32,
                     device=w.device) if need_w else None
    gb = torch.zeros(w.shape[0], dtype=gw.dtype if gw is not None else torch.float32,
                     device=w.device) if need_b else None
    cols = {} if shard is None else dict(col_offset=shard.offset, total_cols=shard.total)
    buffer = _buffer(h2, w, tb)
    for r0 in range(0, N, tb):
        r1 = min(N, r0 + tb)
        x = _block_logits(h2[r0:r1], w, b, buffer, softcap)
        fb = _rows(f, r0, r1)
        upstream = dict(grad_log_prob=None if grad_lp is None else grad_lp[r0:r1],
                        grad_entropy=None if grad_ent is None else grad_ent[r0:r1])
        if _scored_natively(x, shard):
            dz = backward_rows(x, actions[r0:r1], ignore_index, stats[:, r0:r1], ent[r0:r1], **upstream,
                               truncation=(fb, found[r0:r1], None))
        else:
            z, _ = _kept(x, fb, found[r0:r1], shard)
            # d/dz, then times 1 / T as the native route scales it (not the
            # upstream gradients by 1 / T: other bits); the filters are on the
            # CPU, so the untempered block's extra pass is skipped without a sync
            dz = backward_rows(z, actions[r0:r1], ignore_index, stats[:, r0:r1], ent[r0:r1], **upstream, **cols)
            if bool((fb.temperature != 1).any()):
                dz.mul_(inverse_temperature(fb, r1 - r0, acc, z.device)[:, None])
        soft_cap_grad_(dz, x, 1.0, softcap)  # x: the block's capped logits before the temperature
        # the products in the inputs' dtype (hidden's is weight's): one conversion of a 16-bit block's gradient
        dzw = dz.to(w.dtype) if need_h or need_w else None
        if need_h:
            gh[r0:r1] = _hidden_grad(dzw, w, split, reduce_hidden, h2.dtype, pool)
        if need_w:
            gw += (dzw.T @ h2[r0:r1]).to(gw.dtype)
        if need_b:
            gb += dz.sum(0).to(gb.dtype)
    return gh, None if gw is None else gw.to(w.dtype), None if gb is None else gb.to(b.dtype)


class ShardedTruncatedLinearLogProb(torch.autograd.Function):
    """The truncated head over a process group (eager: collectives)."""

    @staticmethod
    def forward(ctx, h2, w, b, actions, ignore_index, f: Filters, threshold, budget, shard, reduce_hidden=True,
                softcap=0.0):
        tb = _block_size(h2.shape[0], w, budget, shard)  # a collective: once, for both passes
        lp, ent, stats, found = truncated_forward(h2, w, b, actions, ignore_index, f, threshold, tb, shard, softcap)
        ctx.save_for_backward(h2, w, b, actions, stats, ent, found)
        ctx.args = (ignore_index, f, tb, shard, reduce_hidden, softcap)
        return lp, ent

    @staticmethod
    def backward(ctx, grad_lp, grad_ent):
        _refuse_double_backward()
        h2, w, b, actions, stats, ent, found = ctx.saved_tensors
        ignore_index, f, tb, shard, reduce_hidden, softcap = ctx.args
        gh, gw, gb = truncated_backward(grad_lp, grad_ent, h2, w, b, actions, stats, ent, found, ignore_index, f,
                                        tb, ctx.needs_input_grad[:3], shard, reduce_hidden, softcap)
        return (gh, gw, gb) + (None,) * 8


# One process: registered ops, so that torch.compile traces a step through
# the truncated head as one graph (the blocks run inside the op).

@torch.library.custom_op("pgest::linear_truncated_log_prob", mutates_args=())
def truncated_log_prob_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], actions: Tensor,
                          ignore_index: Optional[int], temperature: Tensor, top_k: Tensor, top_p: Tensor,
                          min_p: Tensor, threshold: Optional[Tensor], budget: int,
                          softcap: float = 0.0) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(N, H) hidden, (V, H) weight, (N, S) int64 actions and the filters
    (pgest.truncation.Filters: (N,) or (1,) float64, top_k int64; CPU) ->
    log_prob (N, S), entropy (N,), stats (2, N), found (N,) of the kept
    sets; ``threshold`` (N,) of the accumulation type replays a set."""
    _check_op_args(hidden, weight, bias, actions, temperature, top_k, top_p, min_p, threshold, budget)
    f = Filters(temperature, top_k, top_p, min_p)
    return truncated_forward(hidden, weight, bias, actions, ignore_index, f, threshold,
                             _block_size(hidden.shape[0], weight, budget, None), None, softcap)


@truncated_log_prob_op.register_fake
def _(hidden, weight, bias, actions, ignore_index, temperature, top_k, top_p, min_p, threshold, budget, softcap=0.0):
    N, S = actions.shape
    acc = _checks.stats_dtype(hidden.dtype)
    return (hidden.new_empty((N, S), dtype=acc), hidden.new_empty((N,), dtype=acc),
            hidden.new_empty((2, N), dtype=acc), hidden.new_empty((N,), dtype=acc))


@torch.library.custom_op("pgest::linear_truncated_log_prob_backward", mutates_args=())
def truncated_log_prob_backward_op(grad_log_prob: Optional[Tensor], grad_entropy: Optional[Tensor], hidden: Tensor,
                                   weight: Tensor, bias: Optional[Tensor], actions: Tensor, stats: Tensor,
                                   entropy: Tensor, found: Tensor, ignore_index: Optional[int], temperature: Tensor,
                                   top_k: Tensor, top_p: Tensor, min_p: Tensor, budget: int, needs: List[bool],
                                   softcap: float = 0.0) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients for hidden, weight and bias (an empty tensor where ``needs``
    says it is not wanted or there is no bias)."""
    _check_op_args(hidden, weight, bias, actions, temperature, top_k, top_p, min_p, None, budget)
    _checks.check_needs(needs)
    N, S = actions.shape
    acc = _checks.stats_dtype(hidden.dtype)
    for t, name, shape in ((stats, "stats", (2, N)), (entropy, "entropy", (N,)), (found, "found", (N,))):
        _checks.check_tensor(t, name)
        if tuple(t.shape) != shape or t.dtype != acc:
            raise ValueError(f"{name} must be {shape} {acc} from pgest::linear_truncated_log_prob, got "
                             f"{tuple(t.shape)} {t.dtype}")
    if grad_log_prob is not None and tuple(grad_log_prob.shape) != (N, S):
        raise ValueError(f"grad_log_prob must have shape ({N}, {S}), got {tuple(grad_log_prob.shape)}")
    if grad_entropy is not None and tuple(grad_entropy.shape) != (N,):
        raise ValueError(f"grad_entropy must have shape ({N},), got {tuple(grad_entropy.shape)}")
    gh, gw, gb = truncated_backward(grad_log_prob, grad_entropy, hidden, weight, bias, actions, stats, entropy, found,
                                    ignore_index, Filters(temperature, top_k, top_p, min_p),
                                    _block_size(hidden.shape[0], weight, budget, None), needs,
                                    softcap=softcap)
    empty = hidden.new_empty((0,))
    return (gh if gh is not None else empty, gw if gw is not None else empty.clone(),
            gb if gb is not None else empty.clone())


@truncated_log_prob_backward_op.register_fake
def _(grad_log_prob, grad_entropy, hidden, weight, bias, actions, stats, entropy, found, ignore_index, temperature,
      top_k, top_p, min_p, budget, needs, softcap=0.0):
    _checks.check_needs(needs)
    return (hidden.new_empty(hidden.shape) if needs[0] else hidden.new_empty((0,)),
            weight.new_empty(weight.shape) if needs[1] else hidden.new_empty((0,)),
            bias.new_empty(bias.shape) if needs[2] and bias is not None else hidden.new_empty((0,)))


@torch.library.custom_op("pgest::linear_truncated_sample", mutates_args=())
def truncated_sample_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], temperature: Tensor, top_k: Tensor,
                        top_p: Tensor, min_p: Tensor, num_samples: int, seed: Tensor, budget: int,
                        softcap: float = 0.0) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(N, H) hidden, (V, H) weight and the filters -> actions (N, S),
    log_prob (N, S), entropy (N,) and the record (threshold, kept,
    kept_mass, cut) of each token's kept set: linear_sample with truncation
    under torch.compile. ``seed``: the (2,) int64 of pgest.philox.seed_tensor."""
    from ..ops.truncation import check_values

    _checks.check_head(hidden, weight, bias, 1.0)
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be 2-D (N, H) here, got shape {tuple(hidden.shape)}")
    check_values(temperature, top_k, top_p, min_p, hidden.shape[0])
    S = _checks.check_num_samples(num_samples)
    _checks.check_seed(seed, hidden.device)
    _check_budget(budget)
    actions, lp, ent, rec = sample_tokens(hidden, weight, bias, Filters(temperature, top_k, top_p, min_p), S,
                                          int(seed[0]), budget, None, softcap)
    return (actions, lp, ent, *rec)


@truncated_sample_op.register_fake
def _(hidden, weight, bias, temperature, top_k, top_p, min_p, num_samples, seed, budget, softcap=0.0):
    N = hidden.shape[0]
    acc = _checks.stats_dtype(hidden.dtype)
    return (hidden.new_empty((N, num_samples), dtype=torch.int64), hidden.new_empty((N, num_samples), dtype=acc),
            hidden.new_empty((N,), dtype=acc), hidden.new_empty((N,), dtype=acc),
            hidden.new_empty((N,), dtype=torch.int64), hidden.new_empty((N,), dtype=torch.float64),
            hidden.new_empty((N,), dtype=acc))


register_refusal(truncated_sample_op, "pgest.linear_sample")
# per element: a vmapped weight needs its own gradient per batch element
register_per_element(truncated_log_prob_op)
register_per_element(truncated_log_prob_backward_op)


def _check_budget(budget) -> None:
    if not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget must be a positive number of logits, got {budget}")


def _check_op_args(hidden, weight, bias, actions, temperature, top_k, top_p, min_p, threshold, budget) -> None:
    """The registered ops' arguments, checked as the public call checks them."""
    from ..ops.truncation import check_values

    _checks.check_head_rows(hidden, weight, bias, actions, 1.0)
    check_values(temperature, top_k, top_p, min_p, hidden.shape[0])
    if threshold is not None:
        _checks.check_tensor(threshold, "threshold")
        acc = _checks.stats_dtype(hidden.dtype)
        if tuple(threshold.shape) != (hidden.shape[0],) or threshold.dtype != acc:
            raise ValueError(f"threshold must be ({hidden.shape[0]},) {acc}, got {tuple(threshold.shape)} "
                             f"{threshold.dtype}")
    _check_budget(budget)


def _refuse_double_backward() -> None:
    refuse_double_backward("linear_log_prob with truncation (top_k, top_p, min_p, threshold or a temperature "
                           "tensor)", "yet; use pgest.log_prob on the logits for them")


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, actions, ignore_index, temperature, top_k, top_p, min_p, _, budget, softcap = inputs
    _, ent, stats, found = output
    ctx.save_for_backward(hidden, weight, bias, actions, stats, ent, found, temperature, top_k, top_p, min_p)
    ctx.args = (ignore_index, budget, softcap)
    ctx.has_bias = bias is not None
    ctx.mark_non_differentiable(stats, found)


def _backward(ctx, grad_lp, grad_ent, _grad_stats, _grad_found):
    hidden, weight, bias, actions, stats, ent, found, temperature, top_k, top_p, min_p = ctx.saved_tensors
    ignore_index, budget, softcap = ctx.args
    needs = [bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1]),
             bool(ctx.has_bias and ctx.needs_input_grad[2])]
    _refuse_double_backward()
    gh, gw, gb = truncated_log_prob_backward_op(grad_lp, grad_ent, hidden, weight, bias, actions, stats, ent, found,
                                                ignore_index, temperature, top_k, top_p, min_p, budget, needs,
                                                softcap)
    return (gh if needs[0] else None, gw if needs[1] else None, gb if needs[2] else None) + (None,) * 9


truncated_log_prob_op.register_autograd(_backward, setup_context=_setup_context)
