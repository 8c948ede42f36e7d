"""Vocabulary-parallel log-probabilities, entropy and sampling on
torch.distributed: each rank of ``process_group`` holds a contiguous shard of
the vocabulary, in rank order (shard sizes may differ), and the same rows and
actions (global token ids). Only O(rows) statistics cross ranks, never the
vocabulary:

1. an all_gather of (shard size, ok) per rank: the layout, and an error on
   any rank raises on every rank instead of leaving the others waiting;
2. on the CPU, one process's pass over the whole rows (chunk_pass.py: two
   all_gathers, of the pieces' maxima and of every 256-column chunk's three
   sums), so every rank holds the bits of the call without a group; on
   CUDA, an all_gather of each rank's per-row statistics of the pieces of
   its shard (row_merge.PIECE columns of the global grid, pgest's native
   row kernel), folded on every rank in the global order of the pieces
   (row_merge.fold): the same bits for groups of any size;
3. one all_reduce (sum) of the chosen tokens' logits, nonzero only on the
   rank that owns each token (a sum of one value and zeros: exact).

The backward needs no communication: each rank's gradient over its shard is
the native backward of pgest.log_prob on the shard with the global
statistics (the vocabulary-tile form of log_prob.h).

Sampling draws the same actions as pgest.sample on the concatenated logits
for the same generator state: the Philox uniforms are keyed by a seed taken
from rank 0's generator (every rank's generator still advances by one draw,
so ranks seeded alike stay alike), the chunk (CUDA: the piece) a draw falls
in is found from the gathered masses, its owner places the draw inside it
with the native walk, and one all_reduce shares the actions.

Nothing here is imported on the path of a call without a process group.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .. import _checks, _status
from .._checks import (
    actions_per_row,
    check_generator,
    check_ignore_index,
    check_logits,
    check_num_samples,
    index_tensor,
)
from ..device_errors import checked_now
from ..ops.log_prob import backward_rows, refuse_double_backward, rows_of
from ..ops.sample import sample_native
from ..philox import cpu_seed, seed_tensor
from ..philox import uniforms as philox_uniforms
from . import chunk_pass
from .row_merge import PIECE, fold, piece_masses, piece_stats, place_draws, sums


def dist_module():
    import torch.distributed as dist

    return dist


class Layout:
    def __init__(self, sizes, rank: int):
        self.sizes = sizes
        self.rank = rank
        self.world = len(sizes)
        self.offsets = [sum(sizes[:r]) for r in range(self.world)]
        self.offset = self.offsets[rank]
        self.total = sum(sizes)


def _device(x) -> torch.device:
    return x.device if isinstance(x, Tensor) else torch.device("cpu")


def exchange(x, group, error: Optional[BaseException], extra: int = 0) -> Tuple[Layout, Tensor]:
    """Collective 1: every rank's (ok, shard size, extra). Raises on every
    rank if any rank failed (that rank re-raises its own error), so a bad
    input on one rank never leaves the others waiting in a later collective."""
    dist = dist_module()
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed ProcessGroup (dist.group.WORLD, or one from "
                        f"dist.new_group), got {type(group).__name__}")
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    mine = torch.tensor([0 if error is None else 1, x.shape[-1] if error is None else 0, extra], dtype=torch.int64,
                        device=_device(x))
    got = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(got, mine, group=group)
    table = torch.stack(got).cpu()
    raise_if_failed(table[:, 0], rank, error)
    return Layout([int(v) for v in table[:, 1]], rank), table


def raise_if_failed(flags: Tensor, rank: int, error: Optional[BaseException]) -> None:
    bad = [i for i, f in enumerate(flags.tolist()) if f]
    if not bad:
        return
    if error is not None:
        raise error
    raise RuntimeError(f"pgest: rank(s) {bad} of the process group failed on their input (their own exception "
                       "says why); this rank stopped with them")


def _first_boundary(offset: int) -> int:
    """The first column of the global piece grid at or after ``offset``."""
    return -(-offset // PIECE) * PIECE


def owned_piece_counts(layout: Layout) -> List[int]:
    """How many pieces of the global grid (row_merge.PIECE columns from
    column 0) each rank owns: those whose first column its shard holds."""
    return [0 if size == 0 else -(-(off + size) // PIECE) - -(-off // PIECE)
            for off, size in zip(layout.offsets, layout.sizes)]


def fragment_lengths(layout: Layout) -> List[int]:
    """Each rank's leading fragment: its columns before its first grid
    boundary, which belong to a piece an earlier rank owns (all 0 when every
    shard starts on the grid)."""
    return [min(size, _first_boundary(off) - off) for off, size in zip(layout.offsets, layout.sizes)]


def gather_fragments(mine: Tensor, layout: Layout, group) -> Optional[List[Tensor]]:
    """Collective for shards that split a piece: this rank's (rows,
    fragment length) leading fragment -> every rank's; None, and no
    collective, when every shard starts on the grid."""
    lens = fragment_lengths(layout)
    most = max(lens)
    if most == 0:
        return None
    buf = torch.zeros((mine.shape[0], most), dtype=mine.dtype, device=mine.device)
    buf[:, :lens[layout.rank]] = mine
    got = [torch.empty_like(buf) for _ in range(layout.world)]
    dist_module().all_gather(got, buf, group=group)
    return [g[:, :n] for g, n in zip(got, lens)]


def owned_pieces(layout: Layout, rank: Optional[int] = None) -> range:
    """The global indices of the pieces this rank (or ``rank``) owns."""
    rank = layout.rank if rank is None else rank
    off, size = layout.offsets[rank], layout.sizes[rank]
    return range(-(-off // PIECE), -(-(off + size) // PIECE) if size else -(-off // PIECE))


def local_span(j: int, layout: Layout) -> Tuple[int, int]:
    """The columns [lo, hi) of piece j (owned by this rank) in its shard."""
    off = layout.offset
    return j * PIECE - off, min((j + 1) * PIECE, layout.total, off + layout.sizes[layout.rank]) - off


def whole_piece(local: Tensor, j: int, layout: Layout, fragments: Optional[List[Tensor]],
                rows=slice(None)) -> Tensor:
    """Piece j (owned by this rank) from ``local``, its columns in this
    shard (local_span): one that runs past the shard is completed from the
    later ranks' fragments (their rows ``rows``), so it holds exactly the
    columns one process's piece holds, in order (the same bits of its
    statistics and draws)."""
    hi = min((j + 1) * PIECE, layout.total)
    have, r = layout.offset + layout.sizes[layout.rank], layout.rank + 1
    if have >= hi:
        return local
    parts = [local]
    while have < hi:  # the later shards' leading columns, up to the piece's end
        parts.append(fragments[r][rows])
        have += fragments[r].shape[1]
        r += 1
    return torch.cat(parts, 1)


def _owned_tiles(x: Tensor, layout: Layout, group) -> List[Tuple[int, Tensor]]:
    """(global index, columns) of each piece this rank owns (whole_piece)."""
    frags = gather_fragments(x[:, :fragment_lengths(layout)[layout.rank]], layout, group)
    tiles = []
    for j in owned_pieces(layout):
        lo, hi = local_span(j, layout)
        tiles.append((j, whole_piece(x[:, lo:hi], j, layout, frags)))
    return tiles


def _shard_pieces(tiles: List[Tuple[int, Tensor]], rows: int, device, probe: Optional[Tensor]) -> Tensor:
    """(rows, pieces, 3) float64 (max, Z, D) of this rank's pieces of the grid."""
    pieces = [sums(*piece_stats(t, 0, j * PIECE, " (this rank's vocabulary shard; the column is global)",
                                probe=probe)) for j, t in tiles]
    if not pieces:
        return torch.zeros((rows, 0, 3), dtype=torch.float64, device=device)
    return torch.stack([torch.stack(p, -1) for p in pieces], 1)


def _pieces_table(x: Tensor, group, layout: Layout, probe: Optional[Tensor],
                  error: Optional[BaseException] = None) -> Tuple[Tensor, int, List[Tuple[int, Tensor]]]:
    """Collectives 2 (and 2b where a shard splits a piece): every piece of the
    global grid, (rows, all pieces, 3) in global order, this rank's first
    piece and its owned pieces' columns. Each piece is computed whole by the
    rank holding its first column, so any group gives one process's pieces
    (and with them its bits). A local error travels as a flag."""
    tiles = _owned_tiles(x, layout, group)
    mine = None
    if error is None:
        try:
            mine = _shard_pieces(tiles, x.shape[0], x.device, probe)
        except ValueError as e:
            error = e
    counts = owned_piece_counts(layout)
    table = gather_pieces(mine, counts, x.shape[0], x.device, group, layout, error)
    return table, sum(counts[:layout.rank]), tiles


def _piece_chunks(j: int, layout: Layout) -> int:
    """How many 256-column chunks of the single pass piece j holds."""
    return -(-(min((j + 1) * PIECE, layout.total) - j * PIECE) // chunk_pass.CHUNK)


class ExactPass:
    """The single pass over rows split across the group (CPU; chunk_pass.py):
    ``stats`` (3, R) [max, log Z, H], each chunk's mass ``weights`` (R, C)
    and running totals ``cum`` (R, C + 1), the same bits on every rank and
    as one process's pass over the whole rows. Rows outside ``probe`` are
    not read (zeros). ``tiles``: this rank's owned pieces, whole."""

    def __init__(self, x: Tensor, group, layout: Layout, probe: Optional[Tensor],
                 error: Optional[BaseException] = None):
        R = x.shape[0]
        acc = _checks.stats_dtype(x.dtype)
        self.tiles = _owned_tiles(x, layout, group)
        rows = torch.arange(R, device=x.device) if probe is None else probe.nonzero().squeeze(1)
        n = rows.shape[0]
        tiles = self.tiles if probe is None else [(j, t[rows]) for j, t in self.tiles]
        # 1. the running max entering each piece: the largest of the pieces before it
        mine = chunk_pass.piece_maxima(tiles, n) if error is None else None
        maxima = gather_pieces(mine, owned_piece_counts(layout), n, x.device, group, layout, error, width=1)
        entering = chunk_pass.entering_maxima(maxima[..., 0])
        # 2. every chunk's statistics from its owner
        counts = [sum(_piece_chunks(j, layout) for j in owned_pieces(layout, r)) for r in range(layout.world)]
        mine = None
        try:
            parts = [chunk_pass.chunk_stats(t, entering[:, j], j * PIECE, rows) for j, t in tiles]
            mine = torch.cat(parts, 1).double() if parts else torch.zeros((n, 0, 3), dtype=torch.float64,
                                                                                        device=x.device)
        except ValueError as e:
            error = e
        table = gather_pieces(mine, counts, n, x.device, group, layout, error)
        # 3. the row, finished alike on every rank
        stats, weights, cum = chunk_pass.finish(table.to(acc), rows)
        if probe is not None:
            full = torch.zeros((3, R), dtype=acc, device=x.device)
            full[:, rows] = stats
            stats = full
        self.stats, self.weights, self.cum = stats, weights, cum

    def draw(self, u: Tensor, layout: Layout) -> Tensor:
        """(R, S) uniforms -> (R, S) float64 actions of the draws that fall in
        this rank's chunks (0 elsewhere: a sum over the ranks places them all)."""
        return chunk_pass.walk_draws(self.tiles, layout.total, self.stats[0], self.weights, self.cum, u)


def piece_counts(layout: Layout):
    """How many pieces of the grid (row_merge.PIECE) each rank's shard holds,
    counted from its own first column (the fused head's pieces)."""
    return [-(-size // PIECE) for size in layout.sizes]


def gather_pieces(mine: Optional[Tensor], counts, rows: int, device, group, layout: Layout,
                  error: Optional[BaseException], width: int = 3) -> Tensor:
    """(rows, counts[rank], width) float64 per piece of this rank, (max, Z, D)
    unless said (None after ``error``) -> (rows, sum(counts), width) of every
    rank's, in rank order (the global order of the pieces when each rank
    holds contiguous ones); raises on every rank if any rank failed."""
    dist = dist_module()
    most = max(counts) if counts else 0
    buf = torch.zeros((most, width, rows + 1), dtype=torch.float64, device=device)
    if error is None:
        buf[:counts[layout.rank], :, :rows] = mine.permute(1, 2, 0)
    else:
        buf[:, :, rows] = 1.0
    if most == 0:  # no rank has a piece: only the flags travel
        buf = torch.full((1, width, rows + 1), 0.0 if error is None else 1.0, dtype=torch.float64, device=device)
    got = [torch.empty_like(buf) for _ in range(layout.world)]
    dist.all_gather(got, buf, group=group)
    raise_if_failed(torch.stack([g[0, 0, rows] for g in got]).cpu(), layout.rank, error)
    table = torch.cat([got[r][:counts[r], :, :rows] for r in range(layout.world)], 0)
    return table.permute(2, 0, 1)


class Shard:
    """This rank's place in a vocabulary split over ``group`` (for the fused
    linear head): the layout exchange happens at construction, carrying
    ``error`` (this rank's failed checks) to every rank."""

    def __init__(self, local_size: int, group, device, error: Optional[BaseException] = None, extra: int = 0):
        probe = torch.empty((0, local_size), device=device)
        self.group = group
        self.layout, table = exchange(probe, group, error, extra)
        self.offset, self.total = self.layout.offset, self.layout.total
        self.seed = int(table[0, 2])  # rank 0's ``extra``
        self.piece_counts = piece_counts(self.layout)
        self.first_piece = sum(self.piece_counts[:self.layout.rank])  # this shard's first piece's global index
        # shards that split pieces of the grid: each piece is computed whole by
        # the rank holding its first column (owned_pieces, piece_columns)
        self.split = max(fragment_lengths(self.layout)) > 0
        self.owned_counts = owned_piece_counts(self.layout)

    def gather_pieces(self, mine: Optional[Tensor], rows: int, device,
                      error: Optional[BaseException] = None) -> Tensor:
        """Every rank's pieces of the grid (the last of a shard may be short):
        (rows, pieces of the whole vocabulary, 3) float64 (max, Z, D)."""
        return gather_pieces(mine, self.piece_counts, rows, device, self.group, self.layout, error)

    def sum_(self, t: Tensor) -> Tensor:
        dist_module().all_reduce(t, group=self.group)
        return t


def _chosen(x: Tensor, actions: Tensor, layout: Layout, keep: Tensor, group) -> Tensor:
    """Collective 3: the logit of each (row, action), from its owner."""
    lo, hi = layout.offset, layout.offset + x.shape[1]
    own = keep & (actions >= lo) & (actions < hi)
    zero = torch.zeros((), dtype=torch.float64, device=x.device)
    if x.shape[1] == 0:  # an empty shard owns no token (and has no column to gather)
        val = torch.zeros(actions.shape, dtype=torch.float64, device=x.device)
    else:
        local = torch.where(own, actions - lo, torch.zeros_like(actions))
        val = torch.where(own, x.gather(1, local).double(), zero)
    dist_module().all_reduce(val, group=group)
    return val


def _check_local(x: Tensor, actions: Optional[Tensor]) -> None:
    _checks.check_float_tensor(x, "logits")
    if x.dim() != 2:
        raise ValueError(f"logits must be 2-D (rows, V_r) here, got {tuple(x.shape)}")
    _checks.check_device_supported(x, "logits")
    if actions is not None and (actions.dim() != 2 or actions.shape[0] != x.shape[0]):
        raise ValueError(f"actions must be ({x.shape[0]}, S), got {tuple(actions.shape)}")


def forward(x: Tensor, actions: Optional[Tensor], ignore_index: Optional[int], group,
            error: Optional[BaseException] = None):
    """(R, V_r) shard, (R, S) global int64 actions or None -> (log_prob (R, S),
    entropy (R,), stats (3, R) = [max, log Z, H], layout). Every rank gets the
    same values. ``error``: what the caller's checks found on this rank."""
    if error is None:
        try:
            _check_local(x, actions)
        except (ValueError, TypeError, NotImplementedError, RuntimeError) as e:
            error = e
    layout, _ = exchange(x, group, error)
    R = x.shape[0]
    acc = _checks.stats_dtype(x.dtype)
    S = 0 if actions is None else actions.shape[1]
    keep = (actions != ignore_index) if (actions is not None and ignore_index is not None) else None
    live = None if keep is None else keep.any(1)
    error = None
    if actions is not None:
        bad = (actions < 0) | (actions >= layout.total)
        if keep is not None:
            bad &= keep
        where = bad.nonzero()
        if where.numel():
            r, s = int(where[0, 0]), int(where[0, 1])
            error = IndexError(f"actions[{r}, {s}] = {int(actions[r, s])} is out of range for {layout.total} actions"
                               + (f" and is not ignore_index ({ignore_index})" if ignore_index is not None else ""))
    # padding rows (every action ignored) are not read, as in pgest.log_prob
    probe = None if live is None or bool(live.all()) else live
    if x.device.type == "cpu":
        # one process's pass: the bits of the call without a group (a range error travels as the flag)
        stats = ExactPass(x, group, layout, probe, error).stats
    else:
        # every rank folds every piece in one order: the same bits for any group
        # whose shards split on the piece grid (a range error travels as the flag)
        table, _, _ = _pieces_table(x, group, layout, probe, error)
        M, LZ, H = fold(table, acc)
        stats = torch.stack([M, LZ, H])
    if live is not None:
        stats = torch.where(live[None, :], stats, torch.zeros((), dtype=acc, device=x.device))
    ent = stats[2].clone()
    if S == 0:
        return torch.zeros((R, 0), dtype=acc, device=x.device), ent, stats, layout
    k = keep if keep is not None else torch.ones_like(actions, dtype=torch.bool)
    xa = _chosen(x, torch.where(k, actions, torch.zeros_like(actions)), layout, k, group)
    lp = torch.where(k, (xa.to(acc) - stats[0][:, None]) - stats[1][:, None], torch.zeros((), dtype=acc,
                                                                                          device=x.device))
    return lp, ent, stats, layout


class _VocabParallelLogProb(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, actions, ignore_index, group):
        lp, ent, stats, layout = forward(x, actions, ignore_index, group)
        ctx.save_for_backward(x, actions, stats)
        ctx.ignore_index, ctx.layout = ignore_index, layout
        ctx.set_materialize_grads(False)
        return lp, ent

    @staticmethod
    def backward(ctx, grad_lp, grad_ent):
        x, actions, stats = ctx.saved_tensors
        if grad_lp is None and grad_ent is None:
            return None, None, None, None
        refuse_double_backward("pgest.log_prob")
        # the shard's columns of the global row: no communication
        with checked_now():
            grad = backward_rows(x, actions, ctx.ignore_index, stats[:2].contiguous(), stats[2],
                                 grad_log_prob=grad_lp if actions is not None else None, grad_entropy=grad_ent,
                                 col_offset=ctx.layout.offset, total_cols=ctx.layout.total)
        return grad, None, None, None


def log_prob(logits: Tensor, actions: Optional[Tensor], ignore_index: Optional[int], group, with_actions: bool):
    """pgest.log_prob / pgest.entropy with ``process_group``: (..., V_r) shards.
    The argument checks run inside the first collective's error exchange."""
    x = a2 = ii = error = None
    lead = ()
    try:
        check_logits(logits, empty_ok=True)  # an empty shard is legal: it contributes nothing
        lead = logits.shape[:-1]
        x = rows_of(logits)
        if with_actions:
            S = actions_per_row(logits, actions)
            _checks.check_device(actions, "actions", logits, "logits")
            a2 = index_tensor(actions, -1).reshape(-1, S)
        ii = check_ignore_index(ignore_index)
    except (ValueError, TypeError, IndexError, NotImplementedError, RuntimeError) as e:
        error = e
    try:
        if error is None and x.requires_grad and torch.is_grad_enabled():
            lp, ent = _VocabParallelLogProb.apply(x, a2, ii, group)
        else:
            lp, ent, _, _ = forward(x, a2, ii, group, error)
    except (ValueError, IndexError) as e:
        raise type(e)(_status.unflatten_message(str(e), lead)) from None
    return (lp.view(actions.shape) if with_actions else None), ent.view(lead)


def sample(logits: Tensor, num_samples: int, generator: Optional[torch.Generator], group):
    """pgest.sample with ``process_group`` -> (actions, log_prob, entropy),
    flat (R, S), (R, S), (R,); the same on every rank."""
    x = error = None
    seed = 0
    try:
        check_logits(logits, empty_ok=True)
        x = rows_of(logits.detach())
        num_samples = check_num_samples(num_samples)
        check_generator(generator, x.device)
        seed = cpu_seed(generator) if x.device.type == "cpu" else int(seed_tensor(generator, x.device)[0])
    except (ValueError, TypeError, NotImplementedError, RuntimeError) as e:
        error = e
    layout, table = exchange(x, group, error, extra=seed)
    seed = int(table[0, 2])  # rank 0's: every rank draws the same uniforms
    return draw_shard(x, philox_uniforms(x.shape[0], num_samples, seed).to(x.device), layout, group)


def draw_shard(x: Tensor, u: Tensor, layout: Layout, group) -> Tuple[Tensor, Tensor, Tensor]:
    """(R, V_r) shard of checked rows and (R, S) uniforms, the same on every
    rank -> (actions, log_prob, entropy) of the draws, the same on every rank."""
    dist = dist_module()
    R, S = u.shape
    acc = _checks.stats_dtype(x.dtype)
    if x.device.type == "cpu":  # one process's pass and walk: the draws of the call without a group
        exact = ExactPass(x, group, layout, None)
        actions = exact.draw(u, layout)
        dist.all_reduce(actions, group=group)  # one owner per draw: a sum of one value and zeros
        actions = actions.to(torch.int64)
        M, LZ, H = exact.stats
        xa = _chosen(x, actions, layout, torch.ones_like(actions, dtype=torch.bool), group)
        return actions, (xa.to(acc) - M[:, None]) - LZ[:, None], H
    table, first, tiles = _pieces_table(x, group, layout, None)
    M, LZ, H = fold(table, acc)
    # every rank places every draw on the whole row's pieces; the owner draws
    j, inner = place_draws(piece_masses(table[..., 0], table[..., 1], M), u)
    actions = torch.zeros((R, S), dtype=torch.float64, device=x.device)
    local = j - first
    for p in torch.unique(local[(local >= 0) & (local < len(tiles))]).tolist():
        rows, ss = (local == p).nonzero(as_tuple=True)
        ur, inv = torch.unique(rows, return_inverse=True)
        piece, tile = tiles[p]
        xs = tile[ur]
        xs = xs if ur.shape[0] == rows.shape[0] else xs[inv]
        with checked_now():
            got, _, _, _ = sample_native(xs.contiguous(), 1, 0, uniforms=inner[rows, ss].contiguous().view(-1, 1))
        actions[rows, ss] = (got.view(-1) + piece * PIECE).double()
    dist.all_reduce(actions, group=group)  # one owner per draw: a sum of one value and zeros
    actions = actions.to(torch.int64)
    xa = _chosen(x, actions, layout, torch.ones_like(actions, dtype=torch.bool), group)
    lp = (xa.to(acc) - M[:, None]) - LZ[:, None]
    return actions, lp, H
