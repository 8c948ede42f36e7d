"""The fused head's tiles of logits: (tokens, vocabulary slice) products in
the logits' dtype, with the bias and the temperature applied as the
materialised formula applies them. Shared by the head's passes
(pgest/linear/head.py, policy_loss.py) and its truncated route
(truncated.py).

Batch invariance: a token's logits must not depend on the other tokens of
the call. The CPU's matmul (oneDNN/MKL in torch 2.13) gives a row the same
bits for any number of rows that is a multiple of 4, at any position, for
any slice of the vocabulary and 1 or 2 threads, but computes the rows past
a multiple of 4 by another kernel (other bits: 1-3 rows, and 5-7 or 9-11
with 2 threads); measured on this project's machine, float32 and float64,
H from 64 to 4096 (tests/test_batch_invariance.py checks it). So every
product here runs on a multiple of 4 rows, padding with zero rows. The
statistics are taken on a fixed grid of PIECE vocabulary entries, whatever
the product tiles, and merged in that grid's order."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

# the vocabulary grid the head's statistics and products run on (re-exported)
from ..distributed.row_merge import PIECE  # noqa: F401

HALF = (torch.float16, torch.bfloat16)
# cuBLAS takes 16-bit inputs with a float32 output at the speed of a 16-bit
# one; torch's CPU matmul has no such kernel (aten::mm.dtype)
MM_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype")
F32_ROWS = 8192
ROW_MULTIPLE = 4


def padded_rows(h: Tensor) -> Tensor:
    """h with zero rows appended up to a multiple of ROW_MULTIPLE rows."""
    extra = -h.shape[0] % ROW_MULTIPLE
    if extra == 0:
        return h
    return torch.cat([h, h.new_zeros((extra,) + tuple(h.shape[1:]))])


def mm_rows(a: Tensor, b: Tensor) -> Tensor:
    """a @ b, each row's bits its own: the rows up to a multiple of
    ROW_MULTIPLE in one product, the rest in a padded one (a copy of a few
    rows, not of a)."""
    n = a.shape[0]
    tail = n % ROW_MULTIPLE
    if tail == 0:
        return a @ b
    rest = (padded_rows(a[n - tail:]) @ b)[:tail]
    return rest if n == tail else torch.cat([a[:n - tail] @ b, rest])


def logits_dtype(dtype: torch.dtype) -> torch.dtype:
    """The logits of 16-bit inputs are kept in float32: the products'
    float32 accumulators are not rounded to 16 bits (which moved log Z and
    the entropy by 0.06-0.08 at logits of std 4, bf16, H = 1024)."""
    return torch.float32 if dtype in HALF else dtype


def weight_scratch(w: Tensor) -> Optional[Tensor]:
    """The float32 buffer products() converts a 16-bit CPU weight into, PIECE
    rows at a time, for a caller making many products of one weight: allocated
    once (fresh copies of 8192 rows per product cost as much as the product,
    in page faults), and a PIECE of rows (32 MiB at H = 4096)."""
    if w.dtype not in HALF or w.is_cuda:
        return None
    return torch.empty((min(PIECE, w.shape[0]), w.shape[1]), dtype=torch.float32, device=w.device)


def products(h: Tensor, w: Tensor, out: Optional[Tensor] = None, scratch: Optional[Tensor] = None) -> Tensor:
    """h @ w.T in logits_dtype (into ``out`` when given). ``h`` may already
    be the float32 copy of 16-bit hidden states (see _vocab_tiles).
    ``scratch``: weight_scratch(w), reused."""
    n = h.shape[0]
    tail = n % ROW_MULTIPLE
    if tail:  # the rows past a multiple of ROW_MULTIPLE in a padded product of their own
        if out is None:
            out = torch.empty((n, w.shape[0]), dtype=logits_dtype(w.dtype), device=h.device)
        if n > tail:
            products(h[:n - tail], w, out[:n - tail], scratch)
        out[n - tail:] = products(padded_rows(h[n - tail:]), w, None, scratch)[:tail]
        return out
    if w.dtype not in HALF:
        return h @ w.T if out is None else torch.mm(h, w.T, out=out)
    if h.is_cuda and MM_OUT_DTYPE:
        x = torch.mm(h, w.T, out_dtype=torch.float32)
        return x if out is None else out.copy_(x)
    # the CPU: products of float32 copies (about 3x a bf16 product's time), of
    # at most F32_ROWS rows of w at a time (a whole head's copy is twice its size)
    hf = h.float()
    if out is None and w.shape[0] <= F32_ROWS:
        return hf @ w.float().T
    if out is None:
        out = torch.empty((n, w.shape[0]), dtype=torch.float32, device=h.device)
    step = F32_ROWS if scratch is None else scratch.shape[0]
    for c0 in range(0, w.shape[0], step):
        part = w[c0:c0 + step]
        wf = part.float() if scratch is None else scratch[:part.shape[0]].copy_(part)
        out[:, c0:c0 + step] = hf @ wf.T
    return out


def soft_cap_(x: Tensor, softcap: float) -> Tensor:
    """Final logit soft-capping (Gemma 2), softcap * tanh(x / softcap), in
    place, in the order transformers computes it (divide, tanh, multiply);
    softcap 0: none."""
    if softcap:
        x.div_(softcap).tanh_().mul_(softcap)
    return x


def soft_cap_grad_(g: Tensor, z: Tensor, temperature: float, softcap: float) -> Tensor:
    """The gradient ``g`` with respect to the capped logits, times the cap's
    derivative 1 - tanh^2, in place; tanh is read back from the finished
    tile ``z`` (capped, then divided by temperature): z * temperature /
    softcap. Nothing without a cap."""
    if softcap:
        t = z * (temperature / softcap)
        g.mul_(1 - t * t)
    return g


def logits_tile(h: Tensor, weight: Tensor, bias: Optional[Tensor], v0: int, v1: int, temperature: float,
                 out: Optional[Tensor] = None, scratch: Optional[Tensor] = None, softcap: float = 0.0) -> Tensor:
    """(hidden @ weight[v0:v1].T + bias[v0:v1]) / temperature in
    logits_dtype, rounded as the materialised formula rounds it (product,
    then the bias, the soft cap, then the scale); into ``out`` (a reused buffer) when
    given; ``scratch``: weight_scratch(weight), reused."""
    x = products(h, weight[v0:v1], out, scratch)
    if bias is not None:
        x += bias[v0:v1]
    soft_cap_(x, softcap)
    if temperature != 1.0:
        x /= temperature
    return x
