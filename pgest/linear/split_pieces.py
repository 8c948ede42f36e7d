"""The pieces of the vocabulary's global grid (row_merge.PIECE columns from
column 0) a rank of a process group owns, for the fused head: each piece
is computed whole by the rank holding its first column, so a group's
statistics, draws and hidden's gradient are one process's bits, also
where shards split pieces."""
from __future__ import annotations

from typing import List, Optional, Tuple

from torch import Tensor

from ..distributed.piece_tree import PieceTree, group_total
from .tiles import PIECE, logits_tile, mm_rows


class SplitPieces:
    """The pieces of the global grid this rank owns. Where shards split
    them, the one that runs past this rank's shard is multiplied whole, as one
    process multiplies it: the later ranks' leading weight rows (and bias)
    are gathered once per call (under 2048 rows a rank, whatever the number
    of tokens) and joined to this rank's, so its products, statistics and
    draws are one process's bits in every dtype (float64's matmul bits
    depend on the product's width: a product of the part alone would not
    be)."""

    def __init__(self, h2, weight, bias, temperature, softcap, shard):
        from ..distributed.vocab_parallel import (
            fragment_lengths,
            gather_fragments,
            local_span,
            owned_pieces,
            whole_piece,
        )

        self.h2, self.w, self.b, self.t, self.c, self.shard = h2, weight, bias, temperature, softcap, shard
        lay = shard.layout
        f = fragment_lengths(lay)[lay.rank]
        # gathered as (H, rows) columns: the fragments' collective joins columns
        w_frags = gather_fragments(weight[:f].detach().T, lay, shard.group)
        b_frags = None if bias is None else gather_fragments(bias[:f].detach()[None], lay, shard.group)
        self.owned = owned_pieces(lay)
        self.whole = {}
        if len(self.owned) and w_frags is not None:  # only the last owned piece can run past the shard
            j = self.owned[-1]
            lo, hi = local_span(j, lay)
            if hi - lo < min(PIECE, lay.total - j * PIECE):
                # contiguous (P, H) rows, the layout one process's weight[v0:v1] has
                w = whole_piece(weight[lo:hi].detach().T, j, lay, w_frags).T.contiguous()
                b = None if bias is None else whole_piece(bias[lo:hi].detach()[None], j, lay, b_frags)[0]
                self.whole[j] = (w, b)

    def logits(self, rows, j: int) -> Tensor:
        """Piece j's logits for the tokens ``rows`` (a slice or an index)."""
        return self.piece(self.h2[rows], j)[0]

    def piece(self, h: Tensor, j: int) -> Tuple[Tensor, Tensor]:
        """Piece j's logits for the tokens ``h`` and its weight rows (whole)."""
        from ..distributed.vocab_parallel import local_span

        if j in self.whole:
            w, b = self.whole[j]
            return logits_tile(h, w, b, 0, w.shape[0], self.t, softcap=self.c), w
        lo, hi = local_span(j, self.shard.layout)
        return logits_tile(h, self.w, self.b, lo, hi, self.t, softcap=self.c), self.w[lo:hi]

    def group_total(self, tree: PieceTree, rows: int, dtype) -> Tensor:
        """Hidden's gradient for ``rows`` tokens from every rank's tree (a
        collective), rounded to ``dtype``: one process's bits."""
        from ..distributed.vocab_parallel import owned_pieces

        lay = self.shard.layout
        return group_total(tree, (rows, self.w.shape[1]), self.h2.device,
                           [owned_pieces(lay, r) for r in range(lay.world)], -(-lay.total // PIECE), dtype,
                           self.shard.group)

    def hidden_tree(self, g: Tensor, pool: Optional[List[Tensor]] = None) -> PieceTree:
        """Hidden's gradient from ``g``, the gradient of this rank's columns
        of a block's logits (a collective: the later ranks' leading columns
        of a piece this rank owns), as this rank's pieces' products."""
        from ..distributed.vocab_parallel import fragment_lengths, gather_fragments, local_span, whole_piece

        lay = self.shard.layout
        frags = gather_fragments(g[:, :fragment_lengths(lay)[lay.rank]], lay, self.shard.group)
        tree = PieceTree(self.owned.start, pool)
        for j in self.owned:
            lo, hi = local_span(j, lay)
            w = self.whole[j][0] if j in self.whole else self.w[lo:hi]
            tree.add(mm_rows(whole_piece(g[:, lo:hi], j, lay, frags).contiguous(), w))
        return tree

    def grad_pieces(self, h: Tensor):
        """_grad_pieces over this rank's columns: its leading fragment (whose
        piece an earlier rank owns: no hidden product here), then each owned
        piece whole (its columns past the shard for hidden's product only)."""
        from ..distributed.vocab_parallel import fragment_lengths, local_span

        lay = self.shard.layout
        f = fragment_lengths(lay)[lay.rank]
        if f:
            yield None, 0, f, logits_tile(h, self.w, self.b, 0, f, self.t, softcap=self.c), None, lay.offset
        for j in self.owned:
            lo, hi = local_span(j, lay)
            x, w = self.piece(h, j)
            yield j, lo, hi, x, w, j * PIECE
