"""Sums over the vocabulary's pieces whose bits do not depend on how the
vocabulary is split: hidden's gradient through the fused head.

Hidden's gradient is a sum over the vocabulary, sum_j g_j @ W_j, one
product per piece j of the grid (row_merge.PIECE columns from column 0).
Floating-point addition is not associative, so a left-to-right sum in one
process and an all-reduce of the ranks' partial sums give different bits,
and different ones again for every tensor-parallel degree. Here the pieces
are added in one fixed binary tree over their global index: node (l, i) is
the sum of pieces [i 2^l, (i + 1) 2^l), its two children added in float64,
and the whole is the left-to-right sum of the maximal aligned blocks of
[0, P). A rank holding pieces [lo, hi) can complete exactly the nodes
inside its range, the maximal aligned blocks of [lo, hi) (at most about
2 log2 P of them); every node above them is the same addition of the same
two children whoever computes it. So one process and any group perform
the same float64 operations on the same operands: the same bits, in every
dtype and for shards that split pieces (each piece is whole on one rank).

One process pays nothing for it: P - 1 additions either way, and up to
log2 P partial sums held instead of one. A group exchanges the ranks'
blocks instead of all-reducing one partial sum: each rank receives every
block's columns [c0, c1) of hidden (an all-to-all), adds its share of the
tree for those columns, and the rounded columns are gathered by all
(about (blocks + 1) x hidden's size a rank, against an all-reduce's 2x)."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

Node = Tuple[int, int]  # (level, index): pieces [index * 2^level, (index + 1) * 2^level)


def dyadic_blocks(lo: int, hi: int) -> List[Node]:
    """The maximal aligned blocks covering pieces [lo, hi), left to right."""
    out, j = [], lo
    while j < hi:
        level = 0
        while j % (2 << level) == 0 and j + (2 << level) <= hi:
            level += 1
        out.append((level, j >> level))
        j += 1 << level
    return out


def _add(left: Tensor, right: Tensor, pool: Optional[List[Tensor]] = None) -> Tensor:
    """left + right in float64 (a product's float32 or 16-bit bits are exact
    in float64), into left's storage where it is already float64, else into
    a float64 buffer of ``pool`` (fresh (tile, H) buffers cost page faults
    comparable to the additions); a float64 right's storage goes back to it."""
    if left.dtype != torch.float64:
        free = [i for i, b in enumerate(pool or ()) if b.shape == left.shape and b.device == left.device]
        left = pool.pop(free[-1]).copy_(left) if free else left.to(torch.float64)
    left.add_(right)
    if pool is not None and len(pool) < 2 and right.dtype == torch.float64 and right.shape == left.shape:
        pool.append(right)  # at most two kept: a float64 pass's products never come back for one
    return left


class PieceTree:
    """Pieces first, first + 1, ... added in order (each a fresh product the
    tree may write into); holds the completed maximal blocks of the pieces
    added so far. ``pool``: float64 buffers shared by the trees of a pass."""

    def __init__(self, first: int, pool: Optional[List[Tensor]] = None):
        self.next = first
        self.stack: List[Tuple[int, int, Tensor]] = []
        self.pool = pool

    def add(self, product: Tensor) -> None:
        level, index, t = 0, self.next, product
        self.next += 1
        while index % 2 == 1 and self.stack and self.stack[-1][:2] == (level, index - 1):
            _, _, left = self.stack.pop()
            level, index, t = level + 1, index // 2, _add(left, t, self.pool)
        self.stack.append((level, index, t))

    def nodes(self) -> Dict[Node, Tensor]:
        return {(level, index): t for level, index, t in self.stack}

    def share(self) -> Tensor:
        """These pieces' sum, left to right in float64 (not the tree's bits:
        what a caller summing the ranks' shares itself gets)."""
        blocks = [t for _, _, t in self.stack]
        return _fold(blocks)


def _fold(values: Sequence[Tensor]) -> Tensor:
    """Left to right in float64; the first value's storage takes the sum."""
    acc = values[0].to(torch.float64)
    for v in values[1:]:
        acc += v
    return acc


def _value(nodes: Dict[Node, Tensor], node: Node) -> Tensor:
    if node in nodes:
        return nodes[node]
    level, index = node
    if level == 0:
        raise KeyError(f"piece {index} is missing from the tree")
    # each node is read once: its left child's storage may take the sum
    return _add(_value(nodes, (level - 1, 2 * index)), _value(nodes, (level - 1, 2 * index + 1)))


def tree_total(nodes: Dict[Node, Tensor], count: int) -> Tensor:
    """The sum of pieces [0, count) in float64 from any disjoint aligned
    blocks covering them: the same bits whichever blocks they are."""
    return _fold([_value(nodes, b) for b in dyadic_blocks(0, count)])


def group_total(tree: PieceTree, shape: Tuple[int, int], device, ranges: Sequence[range], count: int,
                out_dtype, group) -> Tensor:
    """The tree's total over a process group, every rank's (rows, cols)
    blocks exchanged by column ranges (rank r holds pieces ``ranges[r]``;
    every rank knows every rank's blocks from the layout, so only tensors
    travel): each rank adds the whole tree for its columns, rounds to
    ``out_dtype``, and all gather the columns."""
    from .vocab_parallel import dist_module

    dist = dist_module()
    world, rank = len(ranges), dist.get_rank(group)
    rows, cols = shape
    widths = [len(c) for c in torch.arange(cols).tensor_split(world)]
    starts = [sum(widths[:d]) for d in range(world)]
    counts = [len(dyadic_blocks(r.start, r.stop)) for r in ranges]
    mine = [t for _, _, t in tree.stack]
    assert len(mine) == counts[rank], (len(mine), counts[rank])
    if mine:
        blocks = torch.stack([t.to(torch.float64) for t in mine])  # (blocks, rows, cols)
        send = torch.cat([blocks[:, :, s:s + w].reshape(-1) for s, w in zip(starts, widths)])
    else:
        send = torch.empty((0,), dtype=torch.float64, device=device)
    recv = torch.empty((sum(counts) * rows * widths[rank],), dtype=torch.float64, device=device)
    dist.all_to_all_single(recv, send, [c * rows * widths[rank] for c in counts],
                           [counts[rank] * rows * w for w in widths], group=group)
    nodes, at = {}, 0
    for r in ranges:
        for node in dyadic_blocks(r.start, r.stop):
            nodes[node] = recv[at:at + rows * widths[rank]].view(rows, widths[rank])
            at += rows * widths[rank]
    part = tree_total(nodes, count).to(out_dtype) if count else torch.zeros((rows, widths[rank]), dtype=out_dtype,
                                                                            device=device)
    buf = torch.zeros((rows, max(widths)), dtype=out_dtype, device=device)
    buf[:, :widths[rank]] = part
    got = [torch.empty_like(buf) for _ in range(world)]
    dist.all_gather(got, buf, group=group)
    return torch.cat([g[:, :w] for g, w in zip(got, widths)], 1)
