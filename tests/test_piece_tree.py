"""The fixed summation tree over the vocabulary's pieces
(pgest/distributed/piece_tree.py): the same bits from any split of the
pieces into ranges, against the fold a group's all-reduce would do."""
import itertools
import random

import pytest
import torch

from pgest.distributed.piece_tree import PieceTree, dyadic_blocks, tree_total


def _pieces(count, seed):
    g = torch.Generator().manual_seed(seed)
    # products many binades apart: float64 sums whose order shows in the bits
    scale = torch.logspace(-30, 30, count, base=2.0)[torch.randperm(count, generator=g)]
    return [(torch.randn(3, 5, generator=g) * s).float() for s in scale]


@pytest.mark.parametrize("lo,hi", [(0, 1), (0, 16), (3, 4), (1, 15), (5, 37), (6, 64), (0, 75)])
def test_dyadic_blocks_are_aligned_maximal_and_cover_the_range(lo, hi):
    blocks = dyadic_blocks(lo, hi)
    covered = [j for level, i in blocks for j in range(i << level, (i + 1) << level)]
    assert covered == list(range(lo, hi))
    for level, i in blocks:  # maximal: the parent block leaves the range
        parent = ((i // 2) << (level + 1), ((i // 2) + 1) << (level + 1))
        assert parent[0] < lo or parent[1] > hi


def _ranges(count, cuts):
    edges = [0] + sorted(cuts) + [count]
    return [range(a, b) for a, b in zip(edges, edges[1:])]


@pytest.mark.parametrize("count", [1, 2, 7, 16, 63, 75])
def test_any_split_into_ranges_gives_one_process_bits(count):
    pieces = _pieces(count, count)
    one = PieceTree(0)
    for p in pieces:
        one.add(p.clone())
    want = tree_total(one.nodes(), count)
    torch.testing.assert_close(want, torch.stack([p.double() for p in pieces]).sum(0), rtol=1e-12, atol=0)
    rng = random.Random(count)
    splits = [rng.sample(range(1, count), min(k, count - 1)) for k in (1, 2, 4, 9) for _ in range(3)]
    for cuts in splits:
        nodes = {}
        for r in _ranges(count, cuts):
            t = PieceTree(r.start)
            for j in r:
                t.add(pieces[j].clone())
            nodes.update(t.nodes())
        assert torch.equal(tree_total(nodes, count), want), cuts


def test_an_all_reduce_of_the_ranks_shares_would_not():
    # the test above can fail: the ranks' left-to-right shares summed (what
    # an all-reduce of float64 partial sums gives) differ from the tree
    count = 40
    pieces = _pieces(count, 1)
    one = PieceTree(0)
    for p in pieces:
        one.add(p.clone())
    want = tree_total(one.nodes(), count)
    differs = 0
    for cuts in itertools.combinations(range(3, count, 7), 2):
        shares = []
        for r in _ranges(count, cuts):
            t = PieceTree(r.start)
            for j in r:
                t.add(pieces[j].clone())
            shares.append(t.share())
        differs += not torch.equal(shares[0] + shares[1] + shares[2], want)
    assert differs > 0
