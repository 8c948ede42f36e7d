"""pgest.sample: draw actions from logits, with their log-probabilities and the
entropy of each row, in one read of the logits (no softmax is materialised).

Registered as the torch op ``pgest::sample``.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import _status
from ._checks import check_generator, check_logits, check_num_samples, stats_dtype
from .ops.log_prob import rows_of, traced
from .ops.sample import draw_rows, sample_native
from .ops.truncation import empty_record
from .philox import cpu_seed
from .truncation import Truncation, filters, kept_logits, record_of


class Sample(NamedTuple):
    actions: Tensor   # int64 (...,) or (..., S)
    log_prob: Tensor  # log softmax(logits)[action], same shape as actions
    entropy: Tensor   # (...,) entropy of softmax(logits) per row


class TruncatedSample(NamedTuple):
    actions: Tensor     # int64 (...,) or (..., S)
    log_prob: Tensor    # log-probability under the truncated, renormalised distribution
    entropy: Tensor     # (...,) entropy of that distribution
    truncation: Truncation  # the kept set of each row: threshold, kept count, kept mass


def sample(logits: Tensor, num_samples: int = 1, generator: Optional[torch.Generator] = None, *,
           temperature=None, top_k=None, top_p=None, min_p=None, process_group=None):
    """Draw ``num_samples`` actions from softmax(logits) per row, or from
    its truncation by temperature, top-k, top-p and min-p.

    Args:
        logits: (..., K) float32/float64/float16/bfloat16; leading dimensions
            are rows (token-level use: (B, T, K)). fp32 accumulation for 16-bit
            inputs.
        num_samples: S >= 1 independent draws per row.
        generator: a ``torch.Generator`` of the logits' device (default: torch's
            default generator of that device).

    Returns:
        ``Sample(actions, log_prob, entropy)``: int64 actions of shape (...,)
        when S == 1, else (..., S); ``log_prob`` of those actions, same shape;
        ``entropy`` (...,). Float outputs are float32 (float64 for float64
        logits). Nothing here is differentiable: use :func:`pgest.log_prob`
        (or :class:`pgest.Categorical`) for gradients.

    With any of ``temperature``, ``top_k``, ``top_p``, ``min_p`` given (a
    number or one value per row; see :func:`pgest.truncation` for their
    definitions, 0 temperature being greedy), the draws follow softmax of
    ``logits / temperature`` over each row's kept set, with the same Philox
    uniforms as the plain sampler; ``log_prob`` and ``entropy`` are those of
    that renormalised distribution, and the result is a
    ``TruncatedSample(actions, log_prob, entropy, truncation)`` whose
    :class:`~pgest.truncation.Truncation` record (threshold, kept count, kept
    mass, cut) lets the trainer replay the set: ``pgest.log_prob(logits,
    actions, temperature=..., threshold=s.truncation.cut)``. Recomputed by
    :func:`pgest.log_prob` from the same logits and parameters, the set and
    the log-probabilities equal the sampler's bit for bit.

    With ``process_group`` (torch.distributed), each rank passes its
    contiguous vocabulary shard (..., V_r), in rank order: the draws are those
    of the call on the concatenated logits for the same generator state (the
    seed is taken from rank 0's generator; seed every rank's generator alike,
    e.g. ``torch.manual_seed(s)`` on all, so that they advance alike), and
    every rank gets the same actions (global ids), log-probs and entropies.
    """
    f = filters(logits.shape[:-1] if isinstance(logits, Tensor) else (), temperature, top_k, top_p, min_p) \
        if isinstance(logits, Tensor) else None
    if process_group is not None:
        from .distributed.vocab_parallel import sample as vocab_parallel

        lead = logits.shape[:-1] if isinstance(logits, Tensor) else ()
        shape = tuple(lead) if num_samples == 1 else tuple(lead) + (num_samples,)
        if f is not None:  # the global kept set first, then the plain vocabulary-parallel draw from it
            from .distributed.truncation import kept_shard

            x, error = None, None
            try:
                check_logits(logits, empty_ok=True)
                x = rows_of(logits.detach())
            except (ValueError, TypeError) as e:
                error = e
            z, record, _ = kept_shard(x, f, process_group, error=error)
            actions, log_prob, entropy = vocab_parallel(z, num_samples, generator, process_group)
            return TruncatedSample(actions.view(shape), log_prob.view(shape), entropy.view(tuple(lead)),
                                   Truncation(*(t.view(tuple(lead)) for t in record)))
        actions, log_prob, entropy = vocab_parallel(logits, num_samples, generator, process_group)
        return Sample(actions.view(shape), log_prob.view(shape), entropy.view(tuple(lead)))
    check_logits(logits)
    S = check_num_samples(num_samples)
    lead = logits.shape[:-1]
    shape = lead if S == 1 else lead + (S,)
    try:
        x = rows_of(logits.detach())
        if f is None:
            return Sample(*draw_rows(x, S, generator, (shape, lead))[:3])
        if not x.is_cuda and not traced():  # the kept set found and drawn from in one read of each row
            if generator is not None:
                check_generator(generator, x.device)
            record = empty_record(x.shape[0], stats_dtype(x.dtype), x.device)
            out = sample_native(x, S, cpu_seed(generator), shapes=(shape, lead), truncation=(*f, record))
            return TruncatedSample(*out[:3], record_of(*record, lead))
        z, record = kept_logits(x, f, lead=lead)
        return TruncatedSample(*draw_rows(z, S, generator, (shape, lead))[:3], record)
    except ValueError as e:
        raise ValueError(_status.unflatten_message(str(e), lead)) from None
