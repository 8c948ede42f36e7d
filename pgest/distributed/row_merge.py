"""Row statistics of a vocabulary split into pieces, merged: the tiles of the
fused linear head (pgest/linear/head.py) and the shards of a
vocabulary-parallel head (pgest/distributed/vocab_parallel.py) both reduce to this.

Each piece of a row gives (max m_p, log Z_p, entropy H_p) from pgest's native
row kernel. With D = sum e^(x - M) (x - M), so that D_p = Z_p (log Z_p - H_p):

    M = max_p m_p,   Z = sum_p Z_p e^(m_p - M),   D = sum_p e^(m_p - M) (D_p + Z_p (m_p - M))
    log Z = log Z,   H = log Z - D / Z

all in float64. A draw u of the whole row falls in the piece where the
running total of the masses Z_p e^(m_p - M) first exceeds u Z, at the
fraction of that piece's mass the remainder is.
"""
from __future__ import annotations

import math
import re
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from .. import _checks
from ..device_errors import checked_now
from ..ops.log_prob import forward_rows

# The vocabulary grid of split rows: pieces of PIECE entries from column 0
# (from a shard's first column under a group), their statistics folded in
# order. A fixed grid, not the callers' tiles or shards, is what keeps a
# row's numbers the same however the vocabulary is split, wherever the
# splits fall on the grid.
PIECE = 2048


def piece_stats(x: Tensor, row0: Union[int, Tensor] = 0, col0: int = 0, what: str = "", probe: Optional[Tensor] = None
                ) -> Tuple[Tensor, Tensor, Tensor]:
    """(max, log Z, H) of each row of one piece by the native row kernel. A
    row that is all -inf in this piece (a masked tile, a shard of masked
    tokens) is legal here and carries no mass. Errors name the whole row's
    indices (row0, col0: where the piece sits; ``row0`` may instead be the
    whole-row index of each row, when the piece's rows are a gather of the
    live tokens), followed by ``what``.
    ``probe`` (rows,) bool: only these rows are read (padding rows are
    not, as in pgest.log_prob); the others give zeros."""
    if x.shape[1] == 0:
        # an empty piece (a rank's empty vocabulary shard) is legal and carries no mass
        acc = _checks.stats_dtype(x.dtype)
        m = torch.full((x.shape[0],), -math.inf, dtype=acc, device=x.device)
        if probe is not None:
            m.masked_fill_(~probe, 0.0)
        return m, torch.zeros_like(m), torch.zeros_like(m)
    try:
        # the error is needed here and now: a masked piece is legal, and the
        # message names the whole row
        with checked_now():
            if probe is None:
                _, ent, st, _ = forward_rows(x, None, None)
                return st[0], st[1], ent
            # column 0 on the rows to read, -1 (never a column) on the others,
            # skipped as the kernel's ignore_index: the caller's ignore_index
            # may be 0 or any other column and must not stand in for it
            acts = torch.where(probe, 0, -1).to(torch.int64).view(-1, 1)
            _, ent, st, _ = forward_rows(x, acts.contiguous(), -1)
        zero = torch.zeros((), dtype=st.dtype, device=x.device)
        return torch.where(probe, st[0], zero), torch.where(probe, st[1], zero), torch.where(probe, ent, zero)
    except ValueError as e:
        msg = str(e)
        if "is all -inf" in msg:
            return _masked_piece_stats(x, row0, col0, what, probe)
        m = re.match(r"logits\[(\d+), (\d+)\](.*)", msg, re.S)
        if m:
            r = int(m.group(1))
            r = int(row0[r]) if isinstance(row0, Tensor) else row0 + r
            raise ValueError(f"logits[{r}, {col0 + int(m.group(2))}]{what}{m.group(3)}") from None
        raise


def _masked_piece_stats(x: Tensor, row0: Union[int, Tensor], col0: int, what: str,
                        probe: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    """Rare (some row of the piece is all -inf, which the kernel reports
    first): the kernel again on the other rows it was to read, so that their
    NaN or +inf is still reported (with the caller's row index) and their
    statistics are the kernel's; an all -inf row has max -inf and no mass,
    a row outside ``probe`` zeros, as piece_stats gives them."""
    read = ~(x == -math.inf).all(-1)  # a NaN row is read (and refused), not taken for masked
    if probe is not None:
        read &= probe
    rows = read.nonzero().squeeze(1)
    acc = _checks.stats_dtype(x.dtype)
    m = torch.full((x.shape[0],), -math.inf, dtype=acc, device=x.device)
    if probe is not None:
        m.masked_fill_(~probe, 0.0)
    lz = torch.zeros((x.shape[0],), dtype=acc, device=x.device)
    ent = torch.zeros((x.shape[0],), dtype=acc, device=x.device)
    if rows.numel():
        where = row0[rows] if isinstance(row0, Tensor) else rows + row0
        m[rows], lz[rows], ent[rows] = piece_stats(x[rows], where, col0, what)
    return m, lz, ent


def sums(m: Tensor, lz: Tensor, h: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """A piece's (max, log Z, H) as float64 (max, Z, D): the form that merges
    by additions alone (a piece with no mass has Z = D = 0)."""
    m, lz, h = m.double(), lz.double(), h.double()
    live = m > -math.inf
    z = torch.where(live, lz.exp(), torch.zeros_like(lz))
    return m, z, torch.where(live, z * (lz - h), torch.zeros_like(lz))


class Merged:
    """Online merge of piece statistics for a block of rows, in float64."""

    def __init__(self, n: int, device):
        self.M = torch.full((n,), -math.inf, dtype=torch.float64, device=device)
        self.Z = torch.zeros((n,), dtype=torch.float64, device=device)
        self.D = torch.zeros((n,), dtype=torch.float64, device=device)

    def add(self, m: Tensor, lz: Tensor, h: Tensor) -> None:
        self.add_sums(*sums(m, lz, h))

    def add_sums(self, m: Tensor, z: Tensor, d: Tensor) -> None:
        """Fold in pieces given as (max, Z, D) relative to that max."""
        new = torch.maximum(self.M, m)
        finite = new > -math.inf
        zero = torch.zeros_like(new)
        old_live, live = self.M > -math.inf, m > -math.inf
        a = torch.where(old_live, (self.M - new).exp(), zero)
        b = torch.where(live, (m - new).exp(), zero)
        da = torch.where(old_live, self.M - new, zero)
        db = torch.where(live, m - new, zero)
        self.D = torch.where(finite, a * (self.D + self.Z * da) + b * (d + z * db), self.D)
        self.Z = torch.where(finite, a * self.Z + b * z, self.Z)
        self.M = new

    def raw(self) -> Tuple[Tensor, Tensor, Tensor]:
        """(max, Z, D) in float64, unrounded: what a further merge (over the
        ranks of a group) takes, so the whole row is rounded only once."""
        return self.M, self.Z, self.D

    def result(self, acc: torch.dtype, rows: Union[int, Tensor] = 0,
               what: str = "") -> Tuple[Tensor, Tensor, Tensor]:
        """(max, log Z, H) in the accumulation type. A row with no mass in any
        piece (every logit -inf: each piece alone is legal) raises, named by
        ``rows`` (the first row's index, or each row's) and ``what``."""
        dead = self.M == -math.inf
        if bool(dead.any()):
            i = int(dead.nonzero()[0, 0])
            r = int(rows[i]) if isinstance(rows, Tensor) else rows + i
            raise ValueError(f"logits[{r}]{what} is all -inf: no action has positive probability")
        lz = self.Z.log()
        return self.M.to(acc), lz.to(acc), (lz - self.D / self.Z).to(acc)


def fold(table: Tensor, acc: torch.dtype, rows: Union[int, Tensor] = 0,
         what: str = "") -> Tuple[Tensor, Tensor, Tensor]:
    """(rows, P, 3) float64 pieces' (max, Z, D) folded in piece order, as
    the fused head folds its pieces as it goes: the same bits for the same
    pieces, wherever they were computed (the ranks of a group gather their
    pieces and each folds all of them). -> (max, log Z, H) as Merged.result."""
    merged = Merged(table.shape[0], table.device)
    for j in range(table.shape[1]):
        merged.add_sums(table[:, j, 0], table[:, j, 1], table[:, j, 2])
    return merged.result(acc, rows, what)


def piece_masses(piece_m: Tensor, piece_z: Tensor, row_max: Tensor) -> Tensor:
    """(rows, P) masses of pieces given as (max, Z relative to it), relative
    to the rows' max, float64."""
    return (piece_z.double() * (piece_m.double() - row_max.double()[:, None]).exp()).nan_to_num(0.0)


def place_draws(mass: Tensor, u: Tensor) -> Tuple[Tensor, Tensor]:
    """Pieces' masses (rows, P) in piece order and uniforms (rows, S): the
    piece each draw falls in (rows, S) and the draw's uniform within that
    piece, in [0, 1)."""
    cum = mass.cumsum(1)
    t = u * cum[:, -1:]
    j = torch.searchsorted(cum, t, right=True)
    # t rounds up to the total only at the end of a row: the last piece with
    # mass (an empty piece after it, a rank's empty shard, has no column)
    last = mass.shape[1] - 1 - (mass > 0).flip(1).to(torch.int8).argmax(1, keepdim=True)
    j = torch.minimum(j, last)
    before = torch.where(j > 0, cum.gather(1, (j - 1).clamp_min(0)), torch.zeros_like(t))
    inner = ((t - before) / mass.gather(1, j)).clamp(0.0, 1.0 - 2.0**-53)
    return j, inner
