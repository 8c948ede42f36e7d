"""The row pass in parts (csrc/cpu/chunk_pass.cpp, pgest/distributed/chunk_pass.py),
in one process: pieces of a row passed from the running max entering them,
finished from all their chunks, and draws walked chunk by chunk must give
the bits of pgest.log_prob / entropy / sample on the whole row. (The
process-group route built on it: tests/test_vocab_parallel.py.)"""
import math

import pytest
import torch
from helpers import each_isa

import pgest
from pgest.distributed import chunk_pass
from pgest.ops.sample import sample_native

PIECE = 2048


def rows_of(K, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(7, K, generator=g) * 3
    x[1, : K // 2] = -math.inf  # the running max enters later pieces at -inf
    x[2] = torch.sort(x[2]).values * 10  # a new max in every chunk, past the optimistic range
    x[3, -1] = 40.0  # the max in the last, short chunk
    x[4] = 0.0
    return x.to(dtype)


def by_parts(x, u):
    """One process's pass over x cut into pieces of the 2048 grid, and the
    draws t = u Z walked chunk by chunk."""
    R, K = x.shape
    rows = torch.arange(R)
    pieces = [(j, x[:, j * PIECE:(j + 1) * PIECE]) for j in range(-(-K // PIECE))]
    entering = chunk_pass.entering_maxima(chunk_pass.piece_maxima(pieces, R)[..., 0])
    table = torch.cat([chunk_pass.chunk_stats(t.contiguous(), entering[:, j], j * PIECE, rows) for j, t in pieces], 1)
    stats, weights, cum = chunk_pass.finish(table, rows)
    actions = chunk_pass.walk_draws(pieces, K, stats[0], weights, cum, u)
    return stats, actions.to(torch.int64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("K", [5, 300, 2 * PIECE, 2 * PIECE + 300, 5000])
def test_parts_give_the_whole_rows_bits(K, dtype):
    x = rows_of(K, dtype)
    R, S = x.shape[0], 6
    u = torch.rand(R, S, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def run():
        stats, actions = by_parts(x, u)
        every = pgest.log_prob(x, torch.arange(K).expand(R, K)).log_prob
        ent = pgest.entropy(x)
        ref_actions, _, ref_ent, ref_stats = sample_native(x.contiguous(), S, 0, uniforms=u.contiguous())
        return stats, actions, every, ent, ref_actions, ref_ent, ref_stats

    for name, (stats, actions, every, ent, ref_actions, ref_ent, ref_stats) in each_isa(run).items():
        assert torch.equal(stats[2], ent) and torch.equal(stats[2], ref_ent), name
        assert torch.equal(stats[:2], ref_stats), name  # max and log Z
        assert torch.equal((x.to(stats.dtype) - stats[0][:, None]) - stats[1][:, None], every), name
        assert torch.equal(actions, ref_actions), name


def test_errors_name_the_whole_rows_column_and_row():
    x = rows_of(3000, torch.float32)
    x[5, 2100] = math.nan
    rows = torch.tensor([10, 11, 12, 13, 14, 15, 16])
    entering = torch.full((7,), -math.inf)
    with pytest.raises(ValueError, match=r"logits\[15, 2100\] \(this rank's vocabulary shard; the column is global\) "
                                         r"is nan"):
        chunk_pass.chunk_stats(x[:, PIECE:].contiguous(), entering, PIECE, rows)
    dead = torch.full((2, 3, 3), 0.0)
    dead[1, :, 0] = -math.inf  # a row whose every chunk is -inf
    with pytest.raises(ValueError, match=r"logits\[7\] is all -inf"):
        chunk_pass.finish(dead, torch.tensor([6, 7]))
