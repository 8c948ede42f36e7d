"""Errors the CUDA kernels find in the data (a NaN row, an action out of
range), reported without stalling the stream.

Reading a kernel's error word back to the host after every launch is a
synchronisation per op: the host waits for the GPU and the queue drains, the
cost a training loop feels most. By default pgest does not wait:

1. A kernel that finds a bad row poisons that row's outputs: log-probabilities,
   entropies, statistics, losses and gradients become NaN and sampled actions
   -1, so nothing downstream of a bad row is silently plausible.
2. The error word of each launch stays on the device. Every ``FLUSH_EVERY``
   launches the words are gathered into one pinned host buffer by an
   asynchronous copy, and copies that have already landed (an event query, no
   wait) are read: the first error in call order is raised from the pgest call
   that finds it, naming the earlier op, the argument and the row.
3. :func:`check_errors` waits for the words still under way and raises the
   first error, if any: call it where a training loop synchronises anyway
   (logging, the end of an epoch).

``set_sync_errors(True)``, the :func:`sync_errors` context manager or
``PGEST_SYNC_ERRORS=1`` instead check every launch at once, as the CPU does
(one synchronisation per op; the tests use it). Under CUDA-graph capture no
word can be read: errors then show only as the poisoned outputs of each
replay. Rows in deferred messages are the op's flattened rows.

The bookkeeping below does not depend on the device: CPU words (tests)
simply count as landed.
"""
from __future__ import annotations

import contextlib
import os
import threading
from collections import deque
from typing import Deque, Dict, List, Optional, Tuple

import torch

from ._status import raise_for_status

# Launches whose words are gathered and copied to the host at once: one small
# stack kernel and one copy per this many launches.
FLUSH_EVERY = 64
NO_ERROR = 2**63 - 1  # what an error word holds until a kernel reports

_sync = os.environ.get("PGEST_SYNC_ERRORS", "0").strip() not in ("", "0")
_forced = 0  # checked_now() depth: pgest's own ops that synchronise anyway
_lock = threading.Lock()  # autograd runs CUDA backwards on its own threads
# (device, stream) -> (stream, [words], [(op, raise_for_status kwargs)])
_pending: Dict[Tuple[str, int], Tuple[object, List[torch.Tensor], List[Tuple[str, dict]]]] = {}
# (host words (n, 2), event or None, reports), in flush order
_landing: Deque[Tuple[torch.Tensor, Optional[object], List[Tuple[str, dict]]]] = deque()


def set_sync_errors(enabled: bool) -> bool:
    """Check every CUDA launch at once (True) or defer (False, the default).
    Returns the previous setting. Switching to synchronous checks also
    raises any error still deferred (the switch is made)."""
    global _sync
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    previous, _sync = _sync, enabled
    if enabled and not previous:
        check_errors()
    return previous


@contextlib.contextmanager
def sync_errors(enabled: bool = True):
    """``with pgest.sync_errors():`` checks each CUDA launch at once inside;
    ``sync_errors(False)`` defers inside, and on a normal exit back into
    synchronous checks raises what the block left deferred."""
    global _sync
    previous = set_sync_errors(enabled)
    try:
        yield
    except BaseException:
        _sync = previous  # an exception is on its way already
        raise
    set_sync_errors(previous)


@contextlib.contextmanager
def checked_now():
    """Synchronous checks for pgest's own multi-kernel ops that map a kernel's
    rows to the caller's tokens and synchronise anyway (the fused linear
    head, vocabulary-parallel merges)."""
    global _forced
    with _lock:
        _forced += 1
    try:
        yield
    finally:
        with _lock:
            _forced -= 1


def synchronous() -> bool:
    return _sync or _forced > 0


def defers(t: torch.Tensor) -> bool:
    """Whether checks of data on t's device are deferred: CUDA, unless
    synchronous. (The one place that decides; tests point it at the CPU.)"""
    return t.is_cuda and not synchronous()


def defer(words: torch.Tensor, stream, op: str, report: dict) -> None:
    """Keep the (2,) int64 error word of one launch of ``op`` on ``stream``
    (a torch.cuda.Stream, or None for CPU words); ``report`` holds the
    keyword arguments of _status.raise_for_status for its message."""
    key = (str(words.device), 0 if stream is None else stream.cuda_stream)
    with _lock:
        _, words_list, reports = _pending.setdefault(key, (stream, [], []))
        words_list.append(words)
        reports.append((op, report))
        if len(words_list) < FLUSH_EVERY:
            return
        _flush(key)
        found = _read_landed(wait=False)
    if found is not None:
        _raise(*found)


def first_error(bad: torch.Tensor, status, col) -> torch.Tensor:
    """Checks made with torch ops instead of a kernel, on the device: the
    error word [row * 32 + status, col] of the first True entry of ``bad``
    ((R,) or (R, S), row-major), [NO_ERROR, NO_ERROR] when there is none,
    without reading anything back. ``status`` and ``col``: ints, or tensors
    of bad's shape (per entry)."""
    flat = bad.reshape(-1)
    if flat.numel() == 0:
        return torch.full((2,), NO_ERROR, dtype=torch.int64, device=bad.device)
    per_row = bad.shape[-1] if bad.dim() > 1 else 1
    i = torch.where(flat, torch.arange(flat.numel(), device=bad.device), NO_ERROR).argmin()
    hit = flat[i]
    st = status if isinstance(status, int) else status.reshape(-1)[i]
    # a fill, not torch.tensor: no host-to-device copy
    c = torch.full((), col, dtype=torch.int64, device=bad.device) if isinstance(col, int) else col.reshape(-1)[i]
    packed = torch.where(hit, (i // per_row) * 32 + st, NO_ERROR)
    return torch.stack([packed, torch.where(hit, c.to(torch.int64), NO_ERROR)])


def defer_first(words, op: str, report: dict) -> None:
    """Defer the lowest-row word of ``words`` (from first_error), on the
    current stream of their device."""
    w = torch.stack(list(words))
    word = w[w[:, 0].argmin()]
    defer(word, torch.cuda.current_stream(word.device) if word.is_cuda else None, op, report)


def check_errors() -> None:
    """Wait for the error words of every earlier pgest CUDA launch and raise
    the first error they report (in call order), as the call itself would
    have raised it. A no-op when nothing is pending (the CPU never defers)."""
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("pgest.check_errors() cannot read the device during CUDA-graph capture")
    with _lock:
        for key in list(_pending):
            _flush(key)
        found = _read_landed(wait=True)
    if found is not None:
        _raise(*found)


def pending() -> int:
    """Launches whose error words have not been read yet."""
    with _lock:
        return sum(len(w) for _, w, _ in _pending.values()) + sum(len(r) for _, _, r in _landing)


def _flush(key) -> None:
    """Gather the pending words of ``key`` and start their copy to the host,
    on the stream the kernels wrote them on (ordered after those writes)."""
    stream, words_list, reports = _pending.pop(key)
    if stream is None:  # CPU words: already where they are read
        _landing.append((torch.stack(words_list), None, reports))
        return
    with torch.cuda.stream(stream):
        stacked = torch.stack(words_list)
        host = torch.empty(stacked.shape, dtype=torch.int64, pin_memory=True)
        host.copy_(stacked, non_blocking=True)
        event = torch.cuda.Event()
        event.record(stream)
    _landing.append((host, event, reports))


def _read_landed(wait: bool):
    """Read the copies that have landed (all of them with ``wait``), oldest
    first, up to the first error: -> (op, report, status, row, col) or None.
    An error clears everything pending: only the first is reported."""
    while _landing:
        host, event, reports = _landing[0]
        if event is not None and not event.query():
            if not wait:
                return None
            event.synchronize()
        _landing.popleft()
        packed = host[:, 0]
        bad = (packed != NO_ERROR).nonzero()
        if bad.numel():
            i = int(bad[0, 0])
            op, report = reports[i]
            word = int(packed[i])
            _pending.clear()
            _landing.clear()
            return op, report, word & 31, word >> 5, int(host[i, 1])
    return None


def _raise(op: str, report: dict, status: int, row: int, col: int) -> None:
    try:
        raise_for_status((status, row, col, None, None), **report)
    except (ValueError, IndexError, TypeError, RuntimeError) as e:
        raise type(e)(f"{e} (found on the GPU by an earlier {op} call; pgest defers these checks: "
                      "pgest.sync_errors() raises at the call)") from None
    raise RuntimeError(f"pgest: an earlier {op} call reported status {status} at row {row}")
