"""One process's row pass over a vocabulary split across a process group
(CPU): the same bits as ``pgest.log_prob`` / ``entropy`` / ``sample`` on the
whole rows, with no group at all.

The single pass (csrc/cpu/row_stats.h) cuts a row into chunks of 256
columns and sums each chunk's exponentials relative to the running max
entering it, which is the max of every column before the chunk. So:

1. each rank takes the max of each piece of the grid it owns (whole pieces,
   vocab_parallel.whole_piece) and the group gathers them: the running max
   entering each piece is the largest of those before it;
2. each rank runs the native chunk pass over its pieces from that max, and
   the group gathers every chunk's (running max, sum, entropy sum): 3
   float64 a chunk, 24 bytes against a float32 chunk's 1 KiB;
3. every rank finishes the row natively from all the chunks, in chunk order
   (finish_row_stats): max, log Z, entropy, each chunk's mass and the running
   totals the draws are placed on;
4. a draw t = u Z falls in the chunk whose running total first exceeds it;
   that chunk's owner walks it natively from the total before it, with every
   other draw of the row in the same chunk, as the whole row's walk would.

The CUDA kernels tile rows their own way: a CUDA shard keeps the piece fold
(row_merge.fold), whose bits equal those of any other group on the GPU.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .. import _C, _checks, _status
from .row_merge import PIECE

CHUNK = 256  # sampler.h: kChunk
STATS, FINISH, WALK = 0, 1, 2  # chunk_pass.h: ChunkPassMode
GLOBAL_COLUMN = " (this rank's vocabulary shard; the column is global)"


def _args(mode: int, x: Optional[Tensor], rows: int, dtype: torch.dtype):
    a = _C.ChunkPassArgs()
    a.mode = mode
    a.rows = rows
    a.dtype = _checks.DTYPE_CODES[dtype]
    if x is not None:
        a.logits = x.data_ptr()
        a.cols, a.row_stride = x.shape[1], x.stride(0)
    a.num_threads = torch.get_num_threads()
    return a


def chunk_stats(tile: Tensor, entering: Tensor, col0: int, rows: Tensor) -> Tensor:
    """(n, L) columns [col0, col0 + L) of the rows ``rows`` (global indices,
    for errors; any row stride) and the running max entering them (n,) ->
    (n, ceil(L / 256), 3) per chunk: running max after it, sum, entropy sum."""
    acc = _checks.stats_dtype(tile.dtype)
    n = tile.shape[0]
    if tile.stride(1) != 1 and tile.shape[1] > 1:
        tile = tile.contiguous()
    table = torch.empty((n, -(-tile.shape[1] // CHUNK), 3), dtype=acc, device="cpu")
    if n:
        entering = entering.to(acc).contiguous()
        a = _args(STATS, tile, n, tile.dtype)
        a.entering, a.table = entering.data_ptr(), table.data_ptr()
        status, r, c, index, value = _C.chunk_pass_cpu(a)
        if status:
            try:
                _status.raise_for_status((status, int(rows[r]), col0 + c, index, value), input_name="logits",
                                         num_actions=0)
            except ValueError as e:  # "logits[r, c] is ...": the column is the whole row's
                at = str(e).index("]") + 1
                raise ValueError(str(e)[:at] + GLOBAL_COLUMN + str(e)[at:]) from None
    return table


def finish(table: Tensor, rows: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """(n, C, 3) every chunk's statistics in chunk order -> stats (3, n) =
    [max, log Z, H], weights (n, C) each chunk's mass at the row max, cum
    (n, C + 1) float64 their running totals (cum[:, -1] is Z). An all -inf
    row raises, named by ``rows``."""
    n, C, _ = table.shape
    acc = table.dtype
    stats = torch.empty((3, n), dtype=acc, device="cpu")
    weights = torch.empty((n, C), dtype=acc, device="cpu")
    cum = torch.empty((n, C + 1), dtype=torch.float64, device="cpu")
    if n:
        table = table.contiguous()
        a = _args(FINISH, None, n, torch.float64 if acc == torch.float64 else torch.float32)
        a.table, a.chunks = table.data_ptr(), C
        a.row_max = stats.data_ptr()
        a.log_z = a.row_max + n * stats.element_size()
        a.entropy = a.log_z + n * stats.element_size()
        a.weights, a.cum = weights.data_ptr(), cum.data_ptr()
        status, r, c, index, value = _C.chunk_pass_cpu(a)
        if status:
            _status.raise_for_status((status, int(rows[r]), c, index, value), input_name="logits", num_actions=0)
    return stats, weights, cum


def walk(chunk: Tensor, row_max: Tensor, before: Tensor, weight: Tensor, thresholds: Tensor) -> Tensor:
    """One chunk of each of n rows (n, m <= 256), the row max, the running
    total before the chunk and the chunk's mass (n,), and the row's draws
    that fall in it, ascending, +inf past them (n, S) -> (n, S) the column
    of each in the chunk, -1 for +inf."""
    n, S = thresholds.shape
    actions = torch.empty((n, S), dtype=torch.int64, device="cpu")
    if n:
        if chunk.stride(1) != 1 and chunk.shape[1] > 1:
            chunk = chunk.contiguous()
        row_max, weight = row_max.contiguous(), weight.contiguous()
        before, thresholds = before.double().contiguous(), thresholds.double().contiguous()
        a = _args(WALK, chunk, n, chunk.dtype)
        a.row_max, a.weights, a.cum = row_max.data_ptr(), weight.data_ptr(), before.data_ptr()
        a.thresholds, a.num_samples, a.actions = thresholds.data_ptr(), S, actions.data_ptr()
        res = _C.chunk_pass_cpu(a)  # valid rows and thresholds: only memory can fail
        if res[0]:
            _status.raise_for_status(res, input_name="logits", num_actions=0)
        if bool((actions[thresholds < math.inf] < 0).any()):
            raise RuntimeError("pgest: a draw fell outside the chunk its running totals placed it in (a bug: "
                               "please report it)")
    return actions


def draws_by_chunk(t: Tensor, cum: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Thresholds t (R, S) on running totals cum (R, C + 1) -> the chunk each
    falls in (R, S), and t and the sample index sorted ascending per row."""
    ts, order = t.sort(dim=1, stable=True)
    chunk = torch.searchsorted(cum[:, 1:].contiguous(), ts.contiguous(), right=True)
    return chunk.clamp_max(cum.shape[1] - 2), ts, order


def piece_maxima(tiles: List[Tuple[int, Tensor]], rows: int) -> Tensor:
    """(rows, owned pieces, 1) float64: each owned piece's max (exact in
    float64 for every dtype), as vocab_parallel.gather_pieces carries it."""
    out = torch.zeros((rows, len(tiles), 1), dtype=torch.float64, device="cpu")
    for p, (_, tile) in enumerate(tiles):
        out[:, p, 0] = tile.amax(1).double() if tile.shape[1] else -math.inf
    return out


def entering_maxima(maxima: Tensor) -> Tensor:
    """(rows, P) every piece's max in order -> the running max entering each:
    the largest of the pieces before it (-inf before the first)."""
    if maxima.shape[1] == 0:
        return maxima
    first = torch.full((maxima.shape[0], 1), -math.inf, dtype=maxima.dtype, device="cpu")
    return torch.cat([first, maxima.cummax(1).values[:, :-1]], 1)


def walk_draws(tiles: List[Tuple[int, Tensor]], total: int, row_max: Tensor, weights: Tensor, cum: Tensor,
               u: Tensor) -> Tensor:
    """The draws u (R, S) of the rows finished by ``finish`` that fall in the
    chunks of ``tiles`` ((global piece index, its whole columns), contiguous
    pieces of rows of ``total`` columns) -> (R, S) float64 their columns, 0
    for the others. One walk per (row, chunk), with all the row's draws in
    that chunk, as the whole row's walk takes them."""
    R, S = u.shape
    actions = torch.zeros((R, S), dtype=torch.float64, device="cpu")
    if not tiles:
        return actions
    chunk, ts, order = draws_by_chunk(u * cum[:, -1:], cum)  # u Z, as the kernel forms each threshold
    lo, hi = tiles[0][0] * PIECE, min((tiles[-1][0] + 1) * PIECE, total)
    r, s = ((chunk >= lo // CHUNK) & (chunk < -(-hi // CHUNK))).nonzero(as_tuple=True)
    if r.numel() == 0:
        return actions
    # row-major, so each (row, chunk)'s draws are consecutive and ascending
    _, pair, counts = torch.unique_consecutive(r * cum.shape[1] + chunk[r, s], return_inverse=True,
                                               return_counts=True)
    start = counts.cumsum(0) - counts
    pos = torch.arange(r.numel(), device="cpu") - start[pair]
    th = torch.full((counts.numel(), S), math.inf, dtype=torch.float64, device="cpu")
    th[pair, pos] = ts[r, s]
    pr, pc = r[start], chunk[r[start], s[start]]
    local = torch.full(th.shape, -1, dtype=torch.int64, device="cpu")
    piece = pc * CHUNK // PIECE
    for j, tile in tiles:  # each piece's pairs: its whole chunks in one call, a short last one in another
        width = tile.shape[1] - (pc * CHUNK - j * PIECE)
        for short in (False, True):
            sel = ((piece == j) & ((width < CHUNK) if short else (width >= CHUNK))).nonzero().squeeze(1)
            if sel.numel() == 0:
                continue
            m = int(width[sel[0]]) if short else CHUNK
            cols = (pc[sel] * CHUNK - j * PIECE)[:, None] + torch.arange(m, device="cpu")
            local[sel] = walk(tile[pr[sel, None], cols], row_max[pr[sel]], cum[pr[sel], pc[sel]],
                              weights[pr[sel], pc[sel]], th[sel])
    actions[r, order[r, s]] = (local[pair, pos] + chunk[r, s] * CHUNK).double()
    return actions
