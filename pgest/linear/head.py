"""The fused linear head: log-probabilities, entropy and sampling straight from
hidden states and an LM head's weight, without ever building the
(tokens, vocab) logits.

    logits = (hidden @ weight.T + bias) / temperature      (never materialised)

The logits exist one tile at a time: (token tile, vocabulary tile) products by
the platform's matmul (torch.matmul: oneDNN/MKL on the CPU, cuBLAS on the
GPU), and everything row-wise on each tile by pgest's native row kernels
(csrc/include/pgest/log_prob.h, sampler.h). Per token, the tiles' statistics
(max m_t, log Z_t, entropy H_t) merge online in float64:

    M = max_t m_t,   Z = sum_t Z_t e^(m_t - M),   D = sum_t e^(m_t - M) (D_t + Z_t (m_t - M))
    log Z = log Z,   H = log Z - D / Z,           log p(a) = (x_a - M) - log Z

with D = sum e^(x - M) (x - M) (so D_t = Z_t (log Z_t - H_t)). The chosen
logit x_a is one dot product per (token, action), by the same routine for the
trainer and the sampler, so ``linear_sample``'s log-probabilities equal
``linear_log_prob``'s bit for bit.

Workspace: two (token tile, vocabulary tile) buffers (logits and their
gradient), hidden's gradient's float64 partial sums (token tile, H; at most
log2 of the vocabulary's 2048-entry pieces, and one more) and O(tokens)
statistics, whatever the number of tokens.
"""
from typing import List, NamedTuple, Optional, Tuple, Union

import torch
from torch import Tensor

from .. import _checks, _status
from .._checks import (
    check_actions_range,
    check_generator,
    check_head,
    check_head_rows,
    check_ignore_index,
    check_needs,
    check_num_samples,
    check_seed,
    check_softcap,
    check_tile,
    check_token_actions,
    index_tensor,
)
from .._vmap import register_per_element, register_refusal
from ..device_errors import checked_now
from ..distributed.piece_tree import PieceTree, tree_total
from ..distributed.row_merge import Merged, fold, piece_masses, piece_stats, place_draws, sums
from ..ops.log_prob import (
    backward_rows,
    creating_graph,
    functorch_active,
    grad_in_torch_ops,
    refuse_double_backward,
    tangent_in_torch_ops,
    traced,
)
from ..ops.sample import sample_native
from ..philox import cpu_seed, seed_tensor
from ..philox import uniforms as philox_uniforms
from ..truncation import Truncation, filters, replayed_threshold
from .split_pieces import SplitPieces
from .tiles import HALF, MM_OUT_DTYPE, PIECE, logits_tile, mm_rows, padded_rows, soft_cap_, soft_cap_grad_
from .truncated import (
    ShardedTruncatedLinearLogProb,
    block_budget,
    sample_tokens,
    truncated_log_prob_op,
    truncated_sample_op,
)

# Tile sizes (tokens, vocabulary); override per call with token_tile= /
# vocab_tile=. CPU: measured at (2048 tokens, H 1024, V 32000) fp32 fwd+bwd on
# this project's 2-core machine, every pair of {512, 1024, 2048} x {1024 ..
# 16384} ran within 0.95-1.10x of the matmul floor, so the small workspace
# wins. The token tile shrinks for large H (see tile_sizes) to bound the
# workspace. The vocabulary is worked in fixed pieces of tiles.PIECE (2048)
# entries whatever vocab_tile says (batch invariance: see _vocab_tiles); the
# argument is accepted and checked, and shapes nothing else.
DEFAULT_TILES = {"cpu": (1024, 2048), "cuda": (4096, 8192)}
NEVER_BUILT = " (hidden @ weight.T + bias, never built)"  # what an error's logits[...] are


class LinearLogProb(NamedTuple):
    log_prob: Tensor  # (...,) or (..., S): log softmax(logits)[action]
    entropy: Tensor   # (...,)


class LinearSample(NamedTuple):
    actions: Tensor   # int64 (...,) or (..., S)
    log_prob: Tensor  # same shape, equal to linear_log_prob's bit for bit
    entropy: Tensor   # (...,)


# ---- checks ------------------------------------------------------------------

def tile_sizes(hidden: Tensor, token_tile, vocab_tile) -> Tuple[int, int]:
    tn, tv = DEFAULT_TILES.get(hidden.device.type, DEFAULT_TILES["cpu"])
    if token_tile is None and hidden.dim() >= 1 and hidden.shape[-1] > 0:
        # each of hidden's float64 partial sums (token tile x H) stays within
        # 4 MiB: large H, fewer tokens a tile
        tn = max(128, min(tn, 2**19 // hidden.shape[-1]))
    return check_tile(token_tile, "token_tile", tn), check_tile(vocab_tile, "vocab_tile", tv)


# ---- tiles -------------------------------------------------------------------

def _vocab_tiles(h: Tensor, weight: Tensor, bias: Optional[Tensor], temperature: float,
                 full: Optional[Tensor] = None, softcap: float = 0.0):
    """(v0, v1, logits) for each piece of the vocabulary grid (tiles.PIECE
    entries from column 0) of these tokens: a product per piece, or, with
    ``full`` (these tokens' logits over the whole vocabulary, computed once
    by the caller), views of it. Products, statistics and the gradients'
    products all run on the pieces, whatever vocab_tile the caller took:
    the matmul's bits for a column depend on the product's width (float64
    on the CPU: the last 4-8 columns of a width), so a fixed grid is what
    keeps a token's numbers independent of the vocabulary tile."""
    V = weight.shape[0]
    if full is None and h.dtype in HALF and not (h.is_cuda and MM_OUT_DTYPE):
        h = h.float()  # the CPU's float32 products: one copy of the tokens for all their vocabulary tiles
    for v0 in range(0, V, PIECE):
        v1 = min(V, v0 + PIECE)
        yield v0, v1, full[:, v0:v1] if full is not None else logits_tile(h, weight, bias, v0, v1, temperature,
                                                                           softcap=softcap)


def token_tile_stats(h: Tensor, row0: Union[int, Tensor], weight: Tensor, bias: Optional[Tensor],
                      temperature: float, pieces: Optional[Tensor] = None,
                      full: Optional[Tensor] = None, softcap: float = 0.0) -> Merged:
    """The merged float64 statistics of these tokens over the vocabulary's
    pieces, in piece order (the one order every route uses, row_merge.fold
    included: the same bits); with ``pieces`` (n, pieces, 3) also each
    piece's float64 (max, Z, D)."""
    merged = Merged(h.shape[0], h.device)
    for j, (v0, _, x) in enumerate(_vocab_tiles(h, weight, bias, temperature, full, softcap)):
        piece = sums(*piece_stats(x, row0, v0, NEVER_BUILT))
        merged.add_sums(*piece)
        if pieces is not None:
            for c in range(3):
                pieces[:, j, c] = piece[c]
        del x
    return merged


def _row_stats(h2: Tensor, weight: Tensor, bias: Optional[Tensor], temperature: float, tn: int,
               keep_pieces: bool = False, raw: bool = False, index: Optional[Tensor] = None,
               softcap: float = 0.0):
    """(max, log Z, H) of every row of the logits, tile by tile, in the
    accumulation type, or with ``raw`` the float64 (max, Z, D) to merge
    further; with ``keep_pieces`` also each (row, piece of the vocabulary)'s float64
    (max, Z, D). ``index``: the caller's token index of each row of ``h2`` (a
    gather of the live tokens), for the errors."""
    N, V = h2.shape[0], weight.shape[0]
    acc = _checks.stats_dtype(h2.dtype)
    dev = h2.device
    out_dtype = torch.float64 if raw else acc
    M = torch.empty((N,), dtype=out_dtype, device=dev)
    LZ = torch.empty((N,), dtype=out_dtype, device=dev)
    H = torch.empty((N,), dtype=out_dtype, device=dev)
    nt = -(-V // PIECE)
    pieces = torch.empty((N, nt, 3), dtype=torch.float64, device=dev) if keep_pieces else None
    for n0 in range(0, N, tn):
        n1 = min(N, n0 + tn)
        rows = n0 if index is None else index[n0:n1]
        merged = token_tile_stats(h2[n0:n1], rows, weight, bias, temperature,
                                   None if pieces is None else pieces[n0:n1], softcap=softcap)
        M[n0:n1], LZ[n0:n1], H[n0:n1] = merged.raw() if raw else merged.result(acc, rows, NEVER_BUILT)
    return M, LZ, H, pieces


def _sharded_stats(h2: Tensor, weight: Tensor, bias: Optional[Tensor], temperature: float, tn: int, shard,
                   acc: torch.dtype, index: Optional[Tensor] = None, softcap: float = 0.0):
    """(max, log Z, H) and the (rows, pieces, 3) table of every piece of the
    whole vocabulary, for a head split over ``shard``'s group: each rank's
    pieces gathered and folded by every rank in the order one process folds
    them, so the group's numbers are one process's bit for bit, for uneven
    shards on the piece grid and (SplitPieces) off it."""
    if shard.split:
        return _split_stats(SplitPieces(h2, weight, bias, temperature, softcap, shard), tn, acc, index)
    table, error = None, None
    try:
        table = _row_stats(h2, weight, bias, temperature, tn, keep_pieces=True, raw=True, index=index,
                           softcap=softcap)[3]
    except ValueError as e:
        error = e
    table = shard.gather_pieces(table, h2.shape[0], h2.device, error)
    return (*fold(table, acc, 0 if index is None else index, NEVER_BUILT), table)


def _grad_pieces(h: Tensor, weight: Tensor, bias: Optional[Tensor], temperature: float, softcap: float,
                 split: Optional[SplitPieces]):
    """(piece j of the global grid or None, local columns [lo, hi) of weight
    that x's first columns are, logits x, weight rows of x's columns for
    hidden's product, x's first global column) for the backward."""
    if split is not None:
        yield from split.grad_pieces(h)
        return
    for v0, v1, x in _vocab_tiles(h, weight, bias, temperature, softcap=softcap):
        yield v0 // PIECE, v0, v1, x, weight[v0:v1], v0


def _split_stats(sp: SplitPieces, tn: int, acc, index: Optional[Tensor]):
    """_sharded_stats where shards split pieces: this rank's owned pieces,
    whole, gathered and folded in the global order."""
    from ..distributed.vocab_parallel import gather_pieces

    N, dev = sp.h2.shape[0], sp.h2.device
    table, error = torch.zeros((N, len(sp.owned), 3), dtype=torch.float64, device=dev), None
    try:
        for n0 in range(0, N, tn):
            n1 = min(N, n0 + tn)
            rows = n0 if index is None else index[n0:n1]
            for q, j in enumerate(sp.owned):
                table[n0:n1, q] = torch.stack(sums(*piece_stats(sp.logits(slice(n0, n1), j), rows, j * PIECE,
                                                                NEVER_BUILT)), -1)
    except ValueError as e:
        error = e
    shard = sp.shard
    table = gather_pieces(table, shard.owned_counts, N, dev, shard.group, shard.layout, error)
    return (*fold(table, acc, 0 if index is None else index, NEVER_BUILT), table)


def chosen_logits(h2: Tensor, weight: Tensor, bias: Optional[Tensor], actions: Tensor, temperature: float,
                   tn: int, keep: Optional[Tensor] = None, shard=None, softcap: float = 0.0) -> Tensor:
    """x[i, s] = (hidden[i] . weight[a_is] + bias[a_is]) / temperature for (N, S)
    global int64 actions, in the accumulation type: one dot product per
    action, the single routine both linear_log_prob and linear_sample use.
    Entries outside ``keep`` are 0. With ``shard`` each rank computes the
    actions its rows of weight own and the group sums them (one nonzero
    term each: exact)."""
    if shard is not None and weight.shape[0] == 0:  # an empty shard owns no token
        return shard.sum_(torch.zeros(actions.shape, dtype=_checks.stats_dtype(h2.dtype), device=h2.device))
    if shard is not None or keep is not None:
        lo = 0 if shard is None else shard.offset
        own = (actions >= lo) & (actions < lo + weight.shape[0])
        own = own if keep is None else own & keep
        x = chosen_logits(h2, weight, bias, torch.where(own, actions - lo, torch.zeros_like(actions)),
                           temperature, tn, softcap=softcap)
        x = torch.where(own, x, torch.zeros((), dtype=x.dtype, device=x.device))
        return x if shard is None else shard.sum_(x)
    N, S = actions.shape
    out = torch.empty((N, S), dtype=_checks.stats_dtype(h2.dtype), device=h2.device)
    for n0 in range(0, N, tn):
        n1 = min(N, n0 + tn)
        a = actions[n0:n1]
        # one (1, H) x (H, 1) product per (token, action), a multiple of 4 of
        # them: a batch of one takes another kernel (other bits), and so
        # would a token's S actions as one (S, H) product
        wa = padded_rows(weight[a.reshape(-1)]).unsqueeze(1)
        hn = padded_rows(h2[n0:n1].unsqueeze(1).expand(n1 - n0, S, h2.shape[1]).reshape(-1, h2.shape[1]))
        if h2.dtype in HALF:  # the tiles' float32 logits (logits_dtype), to the same bits where products agree
            wa, hn = wa.float(), hn.float()
        x = torch.bmm(wa, hn.unsqueeze(-1)).view(-1)[:(n1 - n0) * S].view(n1 - n0, S)
        if bias is not None:
            x += bias[a]
        soft_cap_(x, softcap)
        if temperature != 1.0:
            x /= temperature
        out[n0:n1] = x
    return out


# ---- forward and backward on (N, H) rows ----------------------------------------

def live_rows(actions: Tensor, ignore_index: Optional[int]) -> Optional[Tensor]:
    """Indices of rows with at least one action that is not ignore_index, or
    None when every row counts (padding rows are skipped everywhere)."""
    if ignore_index is None or actions.shape[1] == 0:
        return None
    live = (actions != ignore_index).any(1)
    if bool(live.all()):
        return None
    return live.nonzero().squeeze(1)


def _forward(h2, weight, bias, actions, ignore_index, temperature, tn, shard=None, softcap: float = 0.0):
    """-> log_prob (N, S), entropy (N,), stats (3, N) = [max, log Z, H].
    ``shard`` (vocab_parallel.Shard): weight and bias are this rank's rows of
    the vocabulary; the statistics are merged over the group and each chosen
    logit comes from the rank that owns it."""
    N, S = actions.shape
    V = weight.shape[0] if shard is None else shard.total
    acc = _checks.stats_dtype(h2.dtype)
    check_actions_range(actions, V, ignore_index)  # actions are the same on every rank: all raise alike
    stats = torch.zeros((3, N), dtype=acc, device=h2.device)
    lp = torch.zeros((N, S), dtype=acc, device=h2.device)
    live = live_rows(actions, ignore_index)
    hl, al = (h2, actions) if live is None else (h2[live], actions[live])
    if hl.shape[0]:
        if shard is None:
            M, LZ, H, _ = _row_stats(hl, weight, bias, temperature, tn, index=live, softcap=softcap)
        else:
            M, LZ, H, _ = _sharded_stats(hl, weight, bias, temperature, tn, shard, acc, live, softcap)
        keep = al != ignore_index if ignore_index is not None else torch.ones_like(al, dtype=torch.bool)
        x = chosen_logits(hl, weight, bias, al, temperature, tn, keep, shard, softcap)
        lpl = torch.where(keep, (x - M[:, None]) - LZ[:, None], torch.zeros((), dtype=acc, device=h2.device))
        if live is None:
            stats[0], stats[1], stats[2], lp = M, LZ, H, lpl
        else:
            stats[:, live] = torch.stack([M, LZ, H])
            lp[live] = lpl
    return lp, stats[2].clone(), stats


def _backward(g_lp, g_ent, h2, weight, bias, actions, stats, ignore_index, temperature, tn,
              need_h: bool, need_w: bool, need_b: bool, shard=None, softcap: float = 0.0,
              reduce_hidden: bool = True):
    """Gradients of sum(g_lp * log_prob) + sum(g_ent * entropy) with respect to
    hidden (N, H), weight (V, H) and bias (V,): each logits tile recomputed
    once, its gradient by the native backward, then two products. With
    ``shard``, weight's rows are the vocabulary [offset, offset + V) of a
    group: hidden's gradient is then the group's (one process's bits), or
    without ``reduce_hidden`` this shard's share in float64."""
    N, S = actions.shape
    V = weight.shape[0]
    dev = h2.device
    acc = _checks.stats_dtype(h2.dtype)
    # contiguous whatever the inputs' strides (zeros_like would copy a
    # transposed layout): what the fake kernels report under torch.compile
    share = shard is not None and not reduce_hidden
    grad_h = torch.zeros(h2.shape, dtype=torch.float64 if share else h2.dtype, device=h2.device) if need_h else None
    # Token tiles outer: weight's gradient accumulates over N / tn tiles (few
    # roundings in 16-bit), hidden's over the vocabulary's pieces in float64,
    # in a fixed tree over the global pieces (piece_tree.py), rounded once:
    # a token's bits whatever the tiles and the tensor-parallel degree (a
    # (token tile, H) conversion or addition per piece, against a (token
    # tile, piece, H) product).
    split = None if shard is None else SplitPieces(h2, weight, bias, temperature, softcap, shard)
    pool: List[Tensor] = []  # the trees' float64 buffers, reused over the token tiles
    grad_w = torch.zeros(weight.shape, dtype=weight.dtype, device=weight.device) if need_w else None
    grad_b = torch.zeros((V,), dtype=acc, device=dev) if need_b else None  # bias has hidden's dtype
    live = live_rows(actions, ignore_index)
    for n0 in range(0, N if live is None else live.shape[0], tn):
        # a slice (views) when every token counts, else the live tokens' indices
        rows = slice(n0, n0 + tn) if live is None else live[n0:n0 + tn]
        st = stats[:, rows]
        upstream = {"grad_log_prob": None if g_lp is None else g_lp[rows],
                    "grad_entropy": None if g_ent is None else g_ent[rows]}
        tree = token_tile_grads(h2[rows], actions[rows], st[:2].contiguous(), st[2], upstream, weight, bias,
                                 ignore_index, temperature, 0, V if shard is None else shard.total,
                                 need_h, grad_w, grad_b, softcap=softcap, split=split, pool=pool)
        if not need_h:
            continue
        if shard is None:
            grad_h[rows] = tree_total(tree.nodes(), tree.next).to(grad_h.dtype)
        elif share:
            if tree.stack:
                grad_h[rows] = tree.share()
        else:
            grad_h[rows] = split.group_total(tree, st.shape[1], h2.dtype)
    if need_b:
        grad_b = grad_b.to(bias.dtype)
    return grad_h, grad_w, grad_b


def token_tile_grads(h, a, row_stats, entropy, upstream, weight, bias, ignore_index, temperature, col0, total,
                      need_h, grad_w, grad_b, full=None, grads16=None, softcap: float = 0.0,
                      split: Optional[SplitPieces] = None, pool: Optional[List[Tensor]] = None):
    """One token tile's share of the three gradients: each vocabulary tile's
    logits (recomputed, or views of ``full``) turned into their gradient by
    the native backward (``upstream``: its weighting arguments), then the two
    products; weight's and bias's gradients accumulate in place. Hidden's
    is returned (or None): the pieces' products in a PieceTree (``split``:
    this rank's pieces of a process group's vocabulary), or with ``full``
    the tile's gradient in h's dtype.

    With ``full`` (the tile's logits over the whole vocabulary, which are
    not needed again) each vocabulary tile's gradient replaces its logits
    (or, for 16-bit inputs, whose logits are float32, goes into ``grads16``
    of the inputs' dtype), and the two products then run once over the
    whole vocabulary: a tile of
    a few thousand columns runs the matmul library below its rate, and
    weight's gradient is read and written once per token tile instead of
    once per (token, vocabulary) tile pair (the three products for 8192 x
    2048 x 32000 fp32 in token tiles of 224 on the CPU: 22.4 s, against
    24.1 s in vocabulary tiles of 4096)."""
    if full is not None:
        scratch = None
        for v0, v1, x in _vocab_tiles(h, weight, bias, temperature, full):
            if scratch is None:
                scratch = torch.empty((x.shape[0] * min(PIECE, weight.shape[0]),), dtype=x.dtype, device=x.device)
            with checked_now():
                g = backward_rows(x, a, ignore_index, row_stats, entropy, col_offset=col0 + v0, total_cols=total,
                                  out=scratch[:x.numel()].view(x.shape), **upstream)
            soft_cap_grad_(g, x, temperature, softcap)  # the 1 / temperature comes after the products
            if grads16 is None:
                x.copy_(g)
            else:
                grads16[:, v0:v1].copy_(g)
                if grad_b is not None:  # from the float32 gradient, before its 16-bit rounding
                    grad_b[v0:v1] += g.sum(0, dtype=grad_b.dtype) / temperature
            del x, g
        # the products in the inputs' dtype, each rounded once (16-bit: fewer
        # roundings than per-tile sums)
        g_all = full if grads16 is None else grads16
        gh = mm_rows(g_all, weight) if need_h else None
        if gh is not None and temperature != 1.0:
            gh /= temperature
        if grad_w is not None:
            grad_w.addmm_(g_all.T, h, alpha=1.0 / temperature)
        if grad_b is not None and grads16 is None:
            grad_b += full.sum(0, dtype=grad_b.dtype) / temperature
        return gh
    tree = PieceTree(0 if split is None else split.owned.start, pool) if need_h else None
    for j, lo, hi, x, w, c0 in _grad_pieces(h, weight, bias, temperature, softcap, split):
        with checked_now():
            g = backward_rows(x, a, ignore_index, row_stats, entropy, col_offset=c0, total_cols=total, **upstream)
        soft_cap_grad_(g, x, temperature, softcap)
        del x
        if temperature != 1.0:
            g /= temperature
        mine = g[:, :hi - lo]  # the columns of this rank's rows (a whole piece may run past them)
        if grad_b is not None:
            grad_b[lo:hi] += mine.sum(0, dtype=grad_b.dtype)
        if g.dtype != h.dtype:  # float32 logits of 16-bit inputs: the products in the inputs' dtype
            g = g.to(h.dtype)
            mine = g[:, :hi - lo]
        if tree is not None and j is not None:
            tree.add(mm_rows(g, w))
        if grad_w is not None:
            grad_w[lo:hi].addmm_(mine.T, h)
        del g, mine
    return tree


# ---- registered ops (torch.compile) and autograd ---------------------------------

@torch.library.custom_op("pgest::linear_log_prob", mutates_args=())
def linear_log_prob_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], actions: Tensor,
                         ignore_index: Optional[int], temperature: float, token_tile: int,
                         vocab_tile: int, softcap: float = 0.0) -> Tuple[Tensor, Tensor, Tensor]:
    """(N, H) hidden, (V, H) weight, (N, S) actions -> (log_prob (N, S),
    entropy (N,), stats (3, N) = [max, log Z, H]). ``softcap``: the logits'
    final soft-capping before the temperature (0: none)."""
    check_head_rows(hidden, weight, bias, actions, temperature)
    check_tile(vocab_tile, "vocab_tile", 1)  # checked; the vocabulary goes in fixed pieces (_vocab_tiles)
    return _forward(hidden, weight, bias, index_tensor(actions, weight.shape[0]), ignore_index, temperature,
                    check_tile(token_tile, "token_tile", 1), softcap=check_softcap(softcap))


@linear_log_prob_op.register_fake
def _(hidden, weight, bias, actions, ignore_index, temperature, token_tile, vocab_tile, softcap=0.0):
    N, S = actions.shape
    acc = _checks.stats_dtype(hidden.dtype)
    return (hidden.new_empty((N, S), dtype=acc), hidden.new_empty((N,), dtype=acc),
            hidden.new_empty((3, N), dtype=acc))


@torch.library.custom_op("pgest::linear_log_prob_backward", mutates_args=())
def linear_log_prob_backward_op(grad_log_prob: Optional[Tensor], grad_entropy: Optional[Tensor], hidden: Tensor,
                             weight: Tensor, bias: Optional[Tensor], actions: Tensor, stats: Tensor,
                             ignore_index: Optional[int], temperature: float, token_tile: int, vocab_tile: int,
                             needs: List[bool], softcap: float = 0.0) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients for hidden, weight and bias (an empty tensor where ``needs``
    says it is not wanted or there is no bias)."""
    check_head_rows(hidden, weight, bias, actions, temperature)
    check_needs(needs)
    _checks.check_tensor(stats, "stats")
    N, S = actions.shape
    acc = _checks.stats_dtype(hidden.dtype)
    if stats.shape != (3, N) or stats.dtype != acc:
        raise ValueError(f"stats must be (3, {N}) {acc} from pgest::linear_log_prob, got {tuple(stats.shape)} "
                         f"{stats.dtype}")
    if grad_log_prob is not None and grad_log_prob.shape != (N, S):
        raise ValueError(f"grad_log_prob must have shape ({N}, {S}), got {tuple(grad_log_prob.shape)}")
    if grad_entropy is not None and grad_entropy.shape != (N,):
        raise ValueError(f"grad_entropy must have shape ({N},), got {tuple(grad_entropy.shape)}")
    acts = index_tensor(actions, weight.shape[0])
    check_actions_range(acts, weight.shape[0], ignore_index)  # the saved actions may have changed since
    gh, gw, gb = _backward(grad_log_prob, grad_entropy, hidden, weight, bias, acts, stats, ignore_index,
                           temperature, check_tile(token_tile, "token_tile", 1), needs[0], needs[1],
                           needs[2] and bias is not None, softcap=check_softcap(softcap))
    empty = hidden.new_empty((0,))
    return (gh if gh is not None else empty, gw if gw is not None else empty.clone(),
            gb if gb is not None else empty.clone())


@linear_log_prob_backward_op.register_fake
def _(grad_log_prob, grad_entropy, hidden, weight, bias, actions, stats, ignore_index, temperature, token_tile,
      vocab_tile, needs, softcap=0.0):
    check_needs(needs)
    return (hidden.new_empty(hidden.shape) if needs[0] else hidden.new_empty((0,)),
            weight.new_empty(weight.shape) if needs[1] else hidden.new_empty((0,)),
            bias.new_empty(bias.shape) if needs[2] and bias is not None else hidden.new_empty((0,)))


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, actions, ignore_index, temperature, token_tile, vocab_tile, softcap = inputs
    ctx.save_for_backward(hidden, weight, bias, actions, output[2])
    ctx.args = (ignore_index, temperature, token_tile, vocab_tile, softcap)
    ctx.has_bias = bias is not None
    ctx.mark_non_differentiable(output[2])


def head_grads_in_torch_ops(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], actions: Tensor,
                           ignore_index: Optional[int], temperature: float, grad_log_prob: Optional[Tensor],
                           grad_entropy: Optional[Tensor], needs, softcap: float = 0.0) -> Tuple[Optional[Tensor], ...]:
    """The gradients of hidden, weight and bias (those ``needs`` asks for) in
    differentiable torch ops, through the materialised (N, V) logits: a
    second derivative or a torch.func transform (log_prob.grad_in_torch_ops)."""
    x = hidden @ weight.T
    if bias is not None:
        x = x + bias
    t = torch.tanh(x / softcap) if softcap else None
    z = x if t is None else t * softcap
    g = grad_in_torch_ops(z / temperature, index_tensor(actions, weight.shape[0]), ignore_index, grad_log_prob,
                          grad_entropy) / temperature
    if t is not None:
        g = g * (1 - t * t)
    return (g @ weight if needs[0] else None, g.T @ hidden if needs[1] else None,
            g.sum(0) if needs[2] and bias is not None else None)


def _backward_fn(ctx, grad_lp, grad_ent, _grad_stats):
    hidden, weight, bias, actions, stats = ctx.saved_tensors
    ignore_index, temperature, token_tile, vocab_tile, softcap = ctx.args
    needs = [bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1]),
             bool(ctx.has_bias and ctx.needs_input_grad[2])]
    if creating_graph():
        gh, gw, gb = head_grads_in_torch_ops(hidden, weight, bias, actions, ignore_index, temperature, grad_lp,
                                             grad_ent, needs, softcap)
        return gh, gw, gb, None, None, None, None, None, None
    gh, gw, gb = linear_log_prob_backward_op(grad_lp, grad_ent, hidden, weight, bias, actions, stats, ignore_index,
                                          temperature, token_tile, vocab_tile, needs, softcap)
    return (gh if needs[0] else None, gw if needs[1] else None, gb if needs[2] else None,
            None, None, None, None, None, None)


linear_log_prob_op.register_autograd(_backward_fn, setup_context=_setup_context)
# a vmapped weight needs its own gradient per batch element: no folding into the tokens
register_per_element(linear_log_prob_op)
register_per_element(linear_log_prob_backward_op)


class _FuncLinearLogProb(torch.autograd.Function):
    """The route under torch.func transforms (see log_prob._FuncLogProb): the
    registered op forward, the gradients in torch ops through the logits."""

    generate_vmap_rule = True

    @staticmethod
    def forward(hidden, weight, bias, actions, ignore_index, temperature, token_tile, vocab_tile, softcap):
        lp, ent, _ = linear_log_prob_op(hidden, weight, bias, actions, ignore_index, temperature, token_tile,
                                          vocab_tile, softcap)
        return lp, ent

    @staticmethod
    def setup_context(ctx, inputs, output):
        hidden, weight, bias, actions, ignore_index, temperature = inputs[:6]
        ctx.save_for_backward(hidden, weight, bias, actions)
        ctx.save_for_forward(hidden, weight, bias, actions)
        ctx.args = (ignore_index, temperature)
        ctx.softcap = inputs[8]

    @staticmethod
    def backward(ctx, grad_lp, grad_ent):
        hidden, weight, bias, actions = ctx.saved_tensors
        grads = head_grads_in_torch_ops(hidden, weight, bias, actions, *ctx.args, grad_lp, grad_ent,
                                        ctx.needs_input_grad[:3], ctx.softcap)
        return grads + (None,) * 6

    @staticmethod
    def jvp(ctx, t_hidden, t_weight, t_bias, *_):
        hidden, weight, bias, actions = ctx.saved_tensors
        ignore_index, temperature = ctx.args
        x, t = hidden @ weight.T, 0
        if bias is not None:
            x = x + bias
        for term in (None if t_hidden is None else t_hidden @ weight.T,
                     None if t_weight is None else hidden @ t_weight.T, t_bias):
            if term is not None:
                t = t + term
        t = t if isinstance(t, Tensor) else torch.zeros_like(x)
        if ctx.softcap:  # through the cap: its value and its derivative
            c = torch.tanh(x / ctx.softcap)
            x, t = c * ctx.softcap, t * (1 - c * c)
        return tangent_in_torch_ops(x / temperature, index_tensor(actions, weight.shape[0]), ignore_index,
                                    t.expand_as(x) / temperature)


class _ShardedLinearLogProb(torch.autograd.Function):
    """The process-group route (a ProcessGroup cannot be a torch.library
    argument): forward and backward as the registered ops, with the
    statistics merged over the group; hidden's gradient is summed over the
    group (each rank's shard contributes its share), so every rank gets the
    full gradient of its replicated hidden states."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, actions, ignore_index, temperature, tn, shard, reduce_hidden, softcap):
        lp, ent, stats = _forward(hidden, weight, bias, actions, ignore_index, temperature, tn, shard, softcap)
        ctx.save_for_backward(hidden, weight, bias, actions, stats)
        ctx.args = (ignore_index, temperature, tn, shard, reduce_hidden, softcap)
        ctx.has_bias = bias is not None
        ctx.set_materialize_grads(False)
        return lp, ent

    @staticmethod
    def backward(ctx, grad_lp, grad_ent):
        hidden, weight, bias, actions, stats = ctx.saved_tensors
        ignore_index, temperature, tn, shard, reduce_hidden, softcap = ctx.args
        refuse_double_backward("pgest.linear_log_prob")
        needs = [bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1]),
                 bool(ctx.has_bias and ctx.needs_input_grad[2])]
        check_actions_range(actions, shard.total, ignore_index)
        gh, gw, gb = _backward(grad_lp, grad_ent, hidden, weight, bias, actions, stats, ignore_index, temperature,
                               tn, needs[0], needs[1], needs[2], shard, softcap, reduce_hidden)
        if gh is not None:
            gh = gh.to(hidden.dtype)
        return gh, gw, gb, None, None, None, None, None, None, None


# ---- the public functions ----------------------------------------------------------

def token_rows(hidden: Tensor) -> Tensor:
    return hidden if hidden.dim() == 2 else hidden.reshape(-1, hidden.shape[-1])


def linear_log_prob(hidden: Tensor, weight: Tensor, actions: Tensor, *, bias: Optional[Tensor] = None,
                    temperature: float = 1.0, ignore_index: Optional[int] = -100,
                    token_tile: Optional[int] = None, vocab_tile: Optional[int] = None,
                    process_group=None, reduce_hidden_grad: bool = True, top_k=None, top_p=None, min_p=None,
                    threshold: Optional[Tensor] = None, softcap: Optional[float] = None) -> LinearLogProb:
    """Differentiable ``log softmax(logits)[actions]`` and the entropy per token
    for ``logits = (hidden @ weight.T + bias) / temperature``, without building
    the logits.

    Args:
        hidden: (..., H) float32/float64/float16/bfloat16 hidden states, any
            strides; leading dimensions are tokens.
        weight: (V, H) LM-head weight (the ``nn.Linear`` layout), dtype of hidden.
        actions: (...,) token ids, or (..., S) for S per token; entries equal
            to ``ignore_index`` give log_prob 0 and no gradient, and a token
            whose every action is ignored is skipped (entropy 0, no work).
        bias: optional (V,).
        temperature: positive; the logits are divided by it (as samplers do).
        softcap: final logit soft-capping before the temperature, ``logits =
            softcap * tanh((hidden @ weight.T + bias) / softcap)``, as Gemma 2
            applies its ``final_logit_softcapping`` (forward and backward in
            the head's pass); None for none.
        token_tile, vocab_tile: tile sizes (defaults DEFAULT_TILES of the
            device); the workspace is about 2 * token_tile * 2048
            logits-sized entries plus token_tile * H float32 (the vocabulary
            goes in fixed pieces of 2048; vocab_tile sizes the truncated
            route's blocks of tokens only).
        process_group: a ``torch.distributed`` group over which the head is
            split by vocabulary (Megatron's layout): each rank passes its
            contiguous rows of ``weight`` (V_r, H) and ``bias`` (V_r,) in rank
            order, and the same ``hidden`` and global ``actions``. Every rank
            gets the same log_prob and entropy; weight and bias get their
            shard's gradient; hidden's gradient is summed over the group,
            one process's bits for any group (a fixed tree over the
            vocabulary's pieces; ``reduce_hidden_grad=False`` leaves each
            rank its shard's share, for stacks whose own layer does that
            reduction, without that guarantee).

    Returns:
        ``LinearLogProb(log_prob, entropy)``, float32 (float64 for float64
        inputs), differentiable with respect to hidden, weight and bias; the
        backward recomputes each logits tile once. For 16-bit inputs the
        logits are the products' float32 results, never rounded to 16 bits
        (the gradients' products run in the inputs' dtype). Statistics are
        accumulated in float32 within a 2048-entry piece of the vocabulary
        and merged across pieces, in order, in float64. A token's numbers
        (log_prob, entropy, hidden's gradient) do not depend on the other
        tokens of the call, the tiles or the threads (the LLM guide says
        how, and what is not covered).

    With ``top_k``, ``top_p``, ``min_p``, a replayed ``threshold``, a
    temperature of 0 (greedy) or one temperature per token (a tensor of the
    tokens' shape): log p and entropy of the truncated, renormalised
    distribution that :func:`linear_sample` draws from with the same
    parameters (definitions in :func:`pgest.truncation`), bit for bit its
    log-probabilities; the logits are then built one block of tokens at a
    time over the whole vocabulary: 8 Mi logits at the default tiles (32 MiB
    in float32: 260 tokens at V = 32000), else as many as token_tile x
    vocab_tile logits, and at least 1/40 of the tokens
    (pgest/linear/truncated.py); with ``process_group``, each rank's blocks
    over its shard, the kept set found by collectives (every rank the same).
    """
    if _truncating(temperature, top_k, top_p, min_p, threshold):
        return _truncated_log_prob(hidden, weight, actions, bias, temperature, top_k, top_p, min_p, threshold,
                                   ignore_index, token_tile, vocab_tile, process_group, reduce_hidden_grad, softcap)
    error = None
    try:
        temperature = check_head(hidden, weight, bias, temperature, process_group is not None)
        softcap = check_softcap(softcap)
        lead, S = check_token_actions(hidden, actions)
        ii = check_ignore_index(ignore_index)
        tn, tv = tile_sizes(hidden, token_tile, vocab_tile)
        traced()  # under torch.func transforms: raises with what to do instead
        a2 = index_tensor(actions, weight.shape[0]).reshape(-1, S)
    except (ValueError, TypeError, IndexError, NotImplementedError, RuntimeError) as e:
        if process_group is None:
            raise
        error = e  # raised on every rank by the first collective
    try:
        if process_group is not None:
            shard = _shard(weight, process_group, hidden, error)
            lp, ent = _ShardedLinearLogProb.apply(token_rows(hidden), weight, bias, a2, ii, temperature, tn, shard,
                                                  bool(reduce_hidden_grad), softcap)
        elif functorch_active():
            lp, ent = _FuncLinearLogProb.apply(token_rows(hidden), weight, bias, a2, ii, temperature, tn, tv,
                                               softcap)
        else:
            lp, ent, _ = linear_log_prob_op(token_rows(hidden), weight, bias, a2, ii, temperature, tn, tv, softcap)
    except (ValueError, IndexError) as e:
        raise type(e)(_status.unflatten_message(str(e), lead)) from None
    return LinearLogProb(lp.view(actions.shape), ent.view(lead))


def _truncating(temperature, *given) -> bool:
    """Whether a call takes the truncated route (pgest/linear/truncated.py)."""
    return any(g is not None for g in given) or isinstance(temperature, Tensor) or \
        (isinstance(temperature, (int, float)) and not isinstance(temperature, bool) and temperature == 0)


def _truncation_setup(hidden, weight, bias, process_group, what: str):
    check_head(hidden, weight, bias, 1.0, process_group is not None)
    if functorch_active():
        raise NotImplementedError(f"{what} with truncation does not run under torch.func transforms (vmap, grad); "
                                  "call it eagerly, or use pgest.log_prob / pgest.sample on the logits")


# One process: the registered op (its blocks run inside it), so a compiled
# step traces through. Over a process group the collectives run eagerly:
# under torch.compile that call is a graph break.
def _truncated_log_prob(hidden, weight, actions, bias, temperature, top_k, top_p, min_p, threshold, ignore_index,
                        token_tile, vocab_tile, process_group, reduce_hidden_grad, softcap) -> LinearLogProb:
    if process_group is not None:
        return _sharded_truncated_log_prob(hidden, weight, actions, bias, temperature, top_k, top_p, min_p, threshold,
                                           ignore_index, token_tile, vocab_tile, process_group, reduce_hidden_grad,
                                           softcap)
    softcap, lead, a2, ii, f, threshold, budget = _truncated_log_prob_args(
        hidden, weight, bias, actions, temperature, top_k, top_p, min_p, threshold, ignore_index, token_tile,
        vocab_tile, None, softcap)
    try:
        lp, ent, _, _ = truncated_log_prob_op(token_rows(hidden), weight, bias, a2, ii, *f, threshold, budget,
                                              softcap)
    except (ValueError, IndexError) as e:
        raise type(e)(_status.unflatten_message(str(e), lead)) from None
    return LinearLogProb(lp.view(actions.shape), ent.view(lead))


def _truncated_log_prob_args(hidden, weight, bias, actions, temperature, top_k, top_p, min_p, threshold, ignore_index,
                             token_tile, vocab_tile, process_group, softcap):
    """The truncated linear_log_prob's checked arguments: softcap, the tokens'
    shape, (N, S) int64 actions, ignore_index, the filters, the replayed
    threshold and the block budget. Over a group the actions' range is
    checked against the whole vocabulary, on every rank (later)."""
    _truncation_setup(hidden, weight, bias, process_group, "linear_log_prob")
    softcap = check_softcap(softcap)
    lead, S = check_token_actions(hidden, actions)
    ii = check_ignore_index(ignore_index)
    tn, tv = tile_sizes(hidden, token_tile, vocab_tile)
    a2 = index_tensor(actions, -1 if process_group is not None else weight.shape[0]).reshape(-1, S)
    f = filters(lead, temperature, top_k, top_p, min_p)
    if threshold is not None:
        threshold = replayed_threshold(threshold, lead.numel(), _checks.stats_dtype(hidden.dtype), hidden.device,
                                       "token")
    return softcap, lead, a2, ii, f, threshold, block_budget(token_tile, vocab_tile, tn, tv)


@torch.compiler.disable
def _sharded_truncated_log_prob(hidden, weight, actions, bias, temperature, top_k, top_p, min_p, threshold,
                                ignore_index, token_tile, vocab_tile, process_group, reduce_hidden_grad,
                                softcap) -> LinearLogProb:
    error, lead = None, ()
    try:
        softcap, lead, a2, ii, f, threshold, budget = _truncated_log_prob_args(
            hidden, weight, bias, actions, temperature, top_k, top_p, min_p, threshold, ignore_index, token_tile,
            vocab_tile, process_group, softcap)
    except (ValueError, TypeError, IndexError, NotImplementedError, RuntimeError) as e:
        error = e  # raised on every rank by the first collective
    shard = _shard(weight, process_group, hidden, error)
    try:
        lp, ent = ShardedTruncatedLinearLogProb.apply(token_rows(hidden), weight, bias, a2, ii, f, threshold, budget,
                                                      shard, bool(reduce_hidden_grad), softcap)
    except (ValueError, IndexError) as e:
        raise type(e)(_status.unflatten_message(str(e), lead)) from None
    return LinearLogProb(lp.view(actions.shape), ent.view(lead))


def _shard(weight, group, hidden, error, seed: int = 0):
    from ..distributed.vocab_parallel import Shard

    size = weight.shape[0] if error is None else 0
    dev = hidden.device if isinstance(hidden, Tensor) else torch.device("cpu")
    return Shard(size, group, dev, error, extra=seed)


def _place(table: Tensor, row_max: Tensor, u: Tensor, rows: Tensor) -> Tuple[Tensor, Tensor]:
    """The piece each draw (rows[k], uniform u[k]) falls in, from the
    (rows, pieces, 3) table's masses, and its uniform within that piece:
    one routine for one process and for a group (the same bits)."""
    j, inner = place_draws(piece_masses(table[rows, :, 0], table[rows, :, 1], row_max[rows]), u.view(-1, 1))
    return j.view(-1), inner.view(-1)


def _draw_in_pieces(h2, w, b, temperature, tn, j, inner, rows, ss, out, offset: int = 0,
                    softcap: float = 0.0, split: Optional[SplitPieces] = None) -> None:
    """Draws (rows[k], ss[k]) placed in this weight's piece j[k] with uniform
    inner[k] within it: that piece of that token recomputed and the draw
    placed by the native sampler. Writes global ids (``offset`` + column)
    to out[rows, ss]. With ``split``, j is the global piece, whole."""
    V = w.shape[0]
    for jj in torch.unique(j).tolist():
        sel = (j == jj).nonzero().squeeze(1)
        v0, v1 = jj * PIECE, min(V, (jj + 1) * PIECE)
        first_id = v0 if split is not None else offset + v0  # the piece's first column's global id
        for n0 in range(0, sel.shape[0], tn):
            k = sel[n0:n0 + tn]
            r = rows[k]
            # Several draws of one token in one piece: its logits once, then copied
            # per draw (a copy is H times cheaper than the product).
            ur, inv = torch.unique(r, return_inverse=True)
            x = logits_tile(h2[ur], w, b, v0, v1, temperature, softcap=softcap) if split is None else \
                split.logits(ur, jj)
            if ur.shape[0] != r.shape[0]:
                x = x[inv]
            with checked_now():
                got, _, _, _ = sample_native(x, 1, 0, uniforms=inner[k].contiguous().view(-1, 1))
            out[r, ss[k]] = (got.view(-1) + first_id).to(out.dtype)


def _sample_args(hidden, num_samples, generator, token_tile, vocab_tile, softcap):
    """linear_sample's checked arguments (both routes): softcap, S, the
    tiles, the tokens' shape and the draws' shape."""
    softcap = check_softcap(softcap)
    S = check_num_samples(num_samples)
    tn, tv = tile_sizes(hidden, token_tile, vocab_tile)
    check_generator(generator, hidden.device)
    lead = hidden.shape[:-1]
    return softcap, S, tn, tv, lead, lead if S == 1 else lead + (S,)


def linear_sample(hidden: Tensor, weight: Tensor, *, bias: Optional[Tensor] = None, temperature: float = 1.0,
                  num_samples: int = 1, generator: Optional[torch.Generator] = None,
                  token_tile: Optional[int] = None, vocab_tile: Optional[int] = None,
                  process_group=None, top_k=None, top_p=None, min_p=None, softcap: Optional[float] = None):
    """Draw ``num_samples`` tokens per row from softmax(logits),
    ``logits = (hidden @ weight.T + bias) / temperature``, without building the
    logits; no gradient.

    The draws are those of ``pgest.sample(logits, num_samples, generator)`` on
    the materialised logits (float32 products for 16-bit inputs, as
    linear_log_prob keeps them) for the same generator state (the same Philox
    uniforms, placed on the same cumulative mass; a uniform within rounding of
    a boundary between two tokens may land on the neighbour). The returned
    ``log_prob`` and ``entropy`` equal ``linear_log_prob``'s for the drawn
    actions bit for bit (same tiles, same accumulation, same dot product), so
    the sampler's and the trainer's log-probabilities agree exactly.

    Cost: the logits tiles once for the statistics, then for each draw only
    the one vocabulary tile it falls in, for that token.

    With ``top_k``, ``top_p``, ``min_p``, a temperature of 0 (greedy) or one
    temperature per token (a tensor of the tokens' shape): the draws of
    :func:`pgest.sample` with those parameters on the logits, returned as a
    ``TruncatedSample(actions, log_prob, entropy, truncation)``;
    :func:`linear_log_prob` with the same parameters (or the record's
    threshold) gives the same log-probabilities bit for bit. The logits are
    then built one block of tokens at a time (see linear_log_prob).
    ``softcap``: the logits' final soft-capping, as linear_log_prob takes it.
    """
    if _truncating(temperature, top_k, top_p, min_p):
        return _truncated_sample(hidden, weight, bias, temperature, top_k, top_p, min_p, num_samples, generator,
                                 token_tile, vocab_tile, process_group, softcap)
    error = None
    seed = 0
    compiled = process_group is None and traced()
    try:
        temperature = check_head(hidden, weight, bias, temperature, process_group is not None)
        softcap, S, tn, tv, lead, shape = _sample_args(hidden, num_samples, generator, token_tile, vocab_tile,
                                                       softcap)
        dev = hidden.device
        # The seed as pgest.sample takes it from the generator: one draw per
        # call, an empty batch included (every sampling op's rule); under
        # torch.compile as a tensor, into the registered op
        if compiled:
            seed = seed_tensor(generator, dev)
        else:
            seed = cpu_seed(generator) if dev.type == "cpu" else int(seed_tensor(generator, dev)[0])
    except (ValueError, TypeError, IndexError, NotImplementedError, RuntimeError) as e:
        if process_group is None:
            raise
        error = e
    if compiled:
        actions, lp, H = linear_sample_op(token_rows(hidden.detach()), weight.detach(),
                                            None if bias is None else bias.detach(), temperature, S, seed, tn, tv,
                                            softcap)
        return LinearSample(actions.view(shape), lp.view(shape), H.view(lead))
    shard = None
    if process_group is not None:
        shard = _shard(weight, process_group, hidden, error, seed)
        seed = shard.seed  # rank 0's: every rank draws the same uniforms
    actions, lp, H = _sample_tokens(token_rows(hidden.detach()), weight.detach(),
                                    None if bias is None else bias.detach(), temperature, S, seed, tn, shard,
                                    softcap)
    return LinearSample(actions.view(shape), lp.view(shape), H.view(lead))


def _truncated_sample(hidden, weight, bias, temperature, top_k, top_p, min_p, num_samples, generator, token_tile,
                      vocab_tile, process_group, softcap):
    from ..sample import TruncatedSample

    if process_group is None and traced():  # under torch.compile: the registered op, its seed a tensor
        _truncation_setup(hidden, weight, bias, None, "linear_sample")
        softcap, S, tn, tv, lead, shape = _sample_args(hidden, num_samples, generator, token_tile, vocab_tile,
                                                       softcap)
        f = filters(lead, temperature, top_k, top_p, min_p)
        out = truncated_sample_op(token_rows(hidden.detach()), weight.detach(),
                                  None if bias is None else bias.detach(), *f, S, seed_tensor(generator, hidden.device),
                                  block_budget(token_tile, vocab_tile, tn, tv), softcap)
        return TruncatedSample(out[0].view(shape), out[1].view(shape), out[2].view(lead),
                               Truncation(*(t.view(lead) for t in out[3:])))
    return _eager_truncated_sample(hidden, weight, bias, temperature, top_k, top_p, min_p, num_samples, generator,
                                   token_tile, vocab_tile, process_group, softcap)


@torch.compiler.disable
def _eager_truncated_sample(hidden, weight, bias, temperature, top_k, top_p, min_p, num_samples, generator,
                            token_tile, vocab_tile, process_group, softcap):
    from ..sample import TruncatedSample

    error, seed = None, 0
    try:
        _truncation_setup(hidden, weight, bias, process_group, "linear_sample")
        softcap, S, tn, tv, lead, shape = _sample_args(hidden, num_samples, generator, token_tile, vocab_tile,
                                                       softcap)
        f = filters(lead, temperature, top_k, top_p, min_p)
        dev = hidden.device
        seed = cpu_seed(generator) if dev.type == "cpu" else int(seed_tensor(generator, dev)[0])
    except (ValueError, TypeError, IndexError, NotImplementedError, RuntimeError) as e:
        if process_group is None:
            raise
        error = e  # raised on every rank by the first collective
    shard = None
    if process_group is not None:
        shard = _shard(weight, process_group, hidden, error, seed)
        seed = shard.seed  # rank 0's: every rank draws the same uniforms
    try:
        actions, lp, ent, rec = sample_tokens(token_rows(hidden.detach()), weight.detach(),
                                              None if bias is None else bias.detach(), f, S, seed,
                                              block_budget(token_tile, vocab_tile, tn, tv), shard, softcap)
    except ValueError as e:
        raise ValueError(_status.unflatten_message(str(e), lead)) from None
    record = Truncation(*(t.view(lead) for t in rec))
    return TruncatedSample(actions.view(shape), lp.view(shape), ent.view(lead), record)


def _sample_tokens(h2: Tensor, w: Tensor, b: Optional[Tensor], temperature: float, S: int, seed: int, tn: int,
                   shard=None, softcap: float = 0.0) -> Tuple[Tensor, Tensor, Tensor]:
    """(N, H) tokens -> actions (N, S), log_prob (N, S), entropy (N,) of
    linear_sample, for a Philox seed already taken (rank 0's with ``shard``)."""
    N, dev = h2.shape[0], h2.device
    acc = _checks.stats_dtype(h2.dtype)
    with torch.no_grad():
        if N == 0:
            return (torch.empty((0, S), dtype=torch.int64, device=dev), torch.empty((0, S), dtype=acc, device=dev),
                    torch.empty((0,), dtype=acc, device=dev))
        u = philox_uniforms(N, S, seed).to(dev)
        rows, ss = torch.meshgrid(torch.arange(N, device=dev), torch.arange(S, device=dev), indexing="ij")
        rows, ss = rows.reshape(-1), ss.reshape(-1)
        if shard is None:
            M, LZ, H, table = _row_stats(h2, w, b, temperature, tn, keep_pieces=True, softcap=softcap)
            actions = torch.empty((N, S), dtype=torch.int64, device=dev)
            j, inner = _place(table, M, u.reshape(-1), rows)
            _draw_in_pieces(h2, w, b, temperature, tn, j, inner, rows, ss, actions, softcap=softcap)
            x = chosen_logits(h2, w, b, actions, temperature, tn, softcap=softcap)
        else:
            # every rank places every draw on the whole vocabulary's pieces; the
            # owner of the piece draws, the group sums (one nonzero each: exact)
            split = SplitPieces(h2, w, b, temperature, softcap, shard) if shard.split else None
            if split is None:
                M, LZ, H, table = _sharded_stats(h2, w, b, temperature, tn, shard, acc, softcap=softcap)
                first, count = shard.first_piece, shard.piece_counts[shard.layout.rank]
            else:  # global pieces, whole, from their owners
                M, LZ, H, table = _split_stats(split, tn, acc, None)
                first, count = split.owned.start, len(split.owned)
            j, inner = _place(table, M, u.reshape(-1), rows)
            mine = ((j >= first) & (j < first + count)).nonzero().squeeze(1)
            actions = torch.zeros((N, S), dtype=torch.float64, device=dev)
            if mine.numel():
                local = j[mine] if split is not None else j[mine] - first
                _draw_in_pieces(h2, w, b, temperature, tn, local, inner[mine], rows[mine], ss[mine],
                                actions, shard.offset, softcap, split)
            actions = shard.sum_(actions).to(torch.int64)
            x = chosen_logits(h2, w, b, actions, temperature, tn, shard=shard, softcap=softcap)
        lp = (x - M[:, None]) - LZ[:, None]
    return actions, lp, H


@torch.library.custom_op("pgest::linear_sample", mutates_args=())
def linear_sample_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], temperature: float, num_samples: int,
                       seed: Tensor, token_tile: int, vocab_tile: int,
                       softcap: float = 0.0) -> Tuple[Tensor, Tensor, Tensor]:
    """(N, H) hidden, (V, H) weight -> (actions (N, S), log_prob (N, S),
    entropy (N,)): linear_sample under torch.compile. ``seed`` is the (2,)
    int64 (seed, offset) of pgest.philox.seed_tensor (offset 0 on the CPU)."""
    temperature = check_head(hidden, weight, bias, temperature)
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be 2-D (N, H) here, got shape {tuple(hidden.shape)}")
    S = check_num_samples(num_samples)
    check_seed(seed, hidden.device)
    check_tile(vocab_tile, "vocab_tile", 1)  # checked; the vocabulary goes in fixed pieces (_vocab_tiles)
    return _sample_tokens(hidden, weight, bias, temperature, S, int(seed[0]), check_tile(token_tile, "token_tile", 1),
                          softcap=check_softcap(softcap))


@linear_sample_op.register_fake
def _(hidden, weight, bias, temperature, num_samples, seed, token_tile, vocab_tile, softcap=0.0):
    N = hidden.shape[0]
    acc = _checks.stats_dtype(hidden.dtype)
    return (hidden.new_empty((N, num_samples), dtype=torch.int64), hidden.new_empty((N, num_samples), dtype=acc),
            hidden.new_empty((N,), dtype=acc))


register_refusal(linear_sample_op, "pgest.linear_sample")
