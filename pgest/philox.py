"""Where the kernels' randomness comes from, and how to reproduce it.

Every draw is Philox4x32-10 keyed by (seed, offset, row, sample): sample ``s``
of row ``i`` is the 53-bit uniform from counter ``(i, offset + s // 2)`` and key
``seed``. A call takes one (seed, offset) from the generator, whatever its
batch size (an empty batch included: ops that draw alike stay alike), so
``torch.manual_seed`` reproduces it and the next call draws afresh; the draw of
a row depends on nothing else (thread count, batch split, instruction set).
"""
from __future__ import annotations

import numbers
import threading
from typing import Optional, Tuple

import torch

from . import _C
from ._checks import check_generator


def _draw_seed(generator: Optional[torch.Generator], device=None) -> torch.Tensor:
    # Out of place, so torch.compile can trace it, and on the input's device,
    # so a CUDA graph replays it: one 63-bit draw per call.
    return torch.randint(0, 2**63 - 1, (), dtype=torch.int64, generator=generator, device=device)


_SEED_BUFFER = threading.local()


def cpu_seed(generator: Optional[torch.Generator]) -> int:
    """The Philox seed of one eager CPU call: the draw of _draw_seed (randint
    is empty().random_(low, high) inside torch, so the same value and the
    same advance of the generator), into a per-thread buffer instead of a
    fresh tensor: half the cost, which is felt at RL sizes."""
    buf = getattr(_SEED_BUFFER, "t", None)
    if buf is None:
        # a normal tensor even when the first call is in inference mode: an
        # inference tensor could never be updated outside it again
        with torch.inference_mode(False):
            buf = _SEED_BUFFER.t = torch.empty((), dtype=torch.int64, device="cpu")
    return buf.random_(0, 2**63 - 1, generator=generator).item()


def next_seed_offset(generator: Optional[torch.Generator], device: torch.device,
                     num_samples: int) -> Tuple[int, int]:
    """Take the (seed, offset) for one call from ``generator`` and advance it.

    On the CPU, torch's generator is a Mersenne Twister with no offset: one
    63-bit draw from it (``torch.randint``) becomes the Philox seed (offset 0),
    which advances it exactly as any other random op would.
    """
    check_generator(generator, device)
    if device.type != "cpu":
        raise NotImplementedError(f"no Philox seeding for {device} yet")
    return cpu_seed(generator), 0


def seed_tensor(generator: Optional[torch.Generator], device: torch.device) -> torch.Tensor:
    """The (seed, offset) of one call as a (2,) int64 tensor on ``device``, the
    form the registered torch ops take: a tensor traces under torch.compile,
    and on a GPU the kernels read it from device memory, so a captured CUDA
    graph draws a fresh seed at every replay. On the CPU it draws exactly what
    :func:`next_seed_offset` draws."""
    check_generator(generator, device)
    return torch.stack([_draw_seed(generator, device), torch.zeros((), dtype=torch.int64, device=device)])


def uniforms(rows: int, num_samples: int, seed: int, offset: int = 0) -> torch.Tensor:
    """The (rows, num_samples) float64 uniforms in [0, 1) that a kernel keyed by
    (seed, offset) draws: sample s of row i is the inverse-CDF point u[i, s] of
    that row (its action is the first column whose running probability mass
    exceeds u[i, s]).

    ``seed`` is any int64 or uint64 value (a negative int64 seed, as a
    seed tensor may hold, is taken modulo 2^64 as the kernels take it);
    ``offset`` is in [0, 2^64)."""
    rows = _check_int(rows, "rows", 0, 2**63)
    num_samples = _check_int(num_samples, "num_samples", 0, 2**63)
    seed = _check_int(seed, "seed", -2**63, 2**64) & (2**64 - 1)
    offset = _check_int(offset, "offset", 0, 2**64)
    out = torch.empty((rows, num_samples), dtype=torch.float64, device="cpu")
    if out.numel():
        _C.philox_uniform(seed, offset, rows, num_samples, out.data_ptr())
    return out


def _check_int(value, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not low <= value < high:
        raise ValueError(f"{name} must be in [{low}, {high}), got {value}")
    return int(value)


def philox4x32_10(counter, key) -> Tuple[int, int, int, int]:
    """One raw Philox4x32-10 block (for known-answer tests)."""
    return _C.philox4x32_10(*counter, *key)
