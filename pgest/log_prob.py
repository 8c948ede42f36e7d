"""pgest.log_prob and pgest.entropy: differentiable log softmax(logits)[action]
and entropy per row, the pair every policy-gradient objective is built from
(REINFORCE, PPO, GRPO, KL penalties; see :mod:`pgest.objectives`).

Forward reads the logits once; backward takes the upstream gradients of both
outputs (either may be absent) and reads the logits once and writes the
gradient once. Autograd saves the logits themselves and O(rows) statistics
(row max, log Z, entropy), never a softmax. ``pgest.policy_loss`` and
``pgest.reinforce`` run on the same kernels (csrc/include/pgest/log_prob.h).

Two routes lead to the kernels. Under ``torch.compile`` (and functorch
transforms) the registered ops ``pgest::log_prob`` / ``pgest::log_prob_backward``
are traced; in eager mode a plain ``autograd.Function`` calls the native code
directly, which skips torch.library's dispatch and schema handling (tens of
microseconds a call, the whole cost at RL action-space sizes). Both routes run
the same code (``forward_rows`` / ``backward_rows``).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

from torch import Tensor

from . import _checks, _status, device_errors
from ._checks import (
    actions_per_row,
    check_ignore_index,
    check_logits,
    index_tensor,
)
from .ops.log_prob import rows_of, rows_pair, traced
from .truncation import (
    check_kept,
    filters,
    kept_logits,
    kept_scores,
    kept_token_ids,
    replayed_threshold,
    scaled,
)


class LogProb(NamedTuple):
    log_prob: Tensor  # log softmax(logits)[action], shape of actions
    entropy: Tensor   # (...,) entropy of softmax(logits) per row


def log_prob(logits: Tensor, actions: Tensor, *, ignore_index: Optional[int] = -100, temperature=None, top_k=None,
             top_p=None, min_p=None, threshold: Optional[Tensor] = None, kept_tokens=None,
             process_group=None) -> LogProb:
    """Differentiable ``log softmax(logits)[actions]`` and the entropy of
    ``softmax(logits)`` per row, from one read of the logits.

    Args:
        logits: (..., K) float32/float64/float16/bfloat16, any strides;
            leading dimensions are rows.
        actions: (...,) integers, or (..., S) for S actions of each row. An
            entry equal to ``ignore_index`` gets log_prob 0 and no gradient,
            as in ``cross_entropy``; a row whose every action is ignored
            (padding) is not read: its entropy is 0 and it gets no gradient.
        ignore_index: the padding value, or None: every action must then be
            in [0, K).
        process_group: a ``torch.distributed`` group over which the
            vocabulary is split: each rank passes its contiguous shard
            (..., V_r) in rank order (sizes may differ) and the same global
            ``actions``; every rank gets the same results, and the gradient
            of its shard (pgest/distributed/vocab_parallel.py). None: no torch.distributed.
        temperature, top_k, top_p, min_p: score under the truncated,
            renormalised distribution :func:`pgest.sample` draws from with the
            same parameters (numbers or one value per row; a per-token
            temperature is a tensor of the rows' shape): ``log p = z_a -
            logsumexp over the kept set`` of ``z = logits / temperature``, and
            the entropy of that distribution. The kept set is a constant of
            the step: the gradient is ``(1[k = a] - q_k) / temperature`` on
            kept entries (plus the entropy term) and 0 elsewhere.
        threshold: one value per row: keep ``logits / temperature >=
            threshold`` instead of recomputing the set (top_k, top_p and
            min_p are then not used). Pass the sampler's ``truncation.cut``
            (robust to logits that differ by rounding) or its
            ``truncation.threshold`` (exact on the same logits only).
        kept_tokens: ``(token_ids, row_offsets)``, an outside sampler's kept
            set in the compressed layout of vLLM's mask replay: row i keeps
            ``token_ids[row_offsets[i]:row_offsets[i + 1]]`` (global ids
            with ``process_group``).

        An action outside its row's kept set raises ``ValueError`` naming the row.

    Returns:
        ``LogProb(log_prob, entropy)``: ``log_prob`` of the shape of
        ``actions``, ``entropy`` of the leading shape; float32 for 16-bit
        logits, float64 for float64. Both are differentiable with respect to
        ``logits``; their backward is one fused pass whatever combination of
        the two the loss uses.

    Numerics: ``log p = (x - max) - log Z`` as in ``torch.log_softmax``
    (a large common offset in a row loses nothing), sums over a row in fp32
    lanes merged in fp64 (fp64 throughout for fp64 logits).
    """
    truncated = not (temperature is None and top_k is None and top_p is None and min_p is None and
                     threshold is None and kept_tokens is None)
    if process_group is not None:
        from .distributed.vocab_parallel import log_prob as vocab_parallel

        if truncated:
            logits = _kept_shard(logits, actions, ignore_index, temperature, top_k, top_p, min_p, threshold,
                                 kept_tokens, process_group)
        return LogProb(*vocab_parallel(logits, actions, ignore_index, process_group, True))
    check_logits(logits)
    S = actions_per_row(logits, actions)
    ii = check_ignore_index(ignore_index)
    _checks.check_device(actions, "actions", logits, "logits")
    lead = logits.shape[:-1]
    try:
        a = index_tensor(actions, logits.shape[-1]).reshape(-1, S)
        x = rows_of(logits)
        if truncated:
            f = filters(lead, temperature, top_k, top_p, min_p) or filters(lead, 1.0)
            if _native_kept(x):
                return LogProb(*kept_scores(x, a, ii, f, threshold, (actions.shape, lead), kept_tokens))
            x, _ = kept_logits(x, f, threshold=threshold, kept_tokens=kept_tokens, with_mass=False)
            scale = check_kept(x, a, ii, lead)
        lp, ent = rows_pair(x, a, ii, (actions.shape, lead))
        if truncated:  # deferred or traced: poisoned rows, and the check kept in the graph
            lp, ent = scaled(lp, scale, lead), scaled(ent, scale, lead)
    except (ValueError, IndexError) as e:
        raise type(e)(_status.unflatten_message(str(e), lead)) from None
    return LogProb(lp, ent)


def entropy(logits: Tensor, *, temperature=None, top_k=None, top_p=None, min_p=None, threshold: Optional[Tensor] = None,
            kept_tokens=None, process_group=None) -> Tensor:
    """Differentiable entropy of ``softmax(logits)`` per row, (..., K) -> (...,),
    in one read of the logits (float32 for 16-bit logits). ``process_group``:
    vocabulary shards, as for :func:`log_prob`. With ``temperature``,
    ``top_k``, ``top_p``, ``min_p``, ``threshold`` or ``kept_tokens``: the
    entropy of the truncated, renormalised distribution, as :func:`log_prob`
    gives it."""
    truncated = not (temperature is None and top_k is None and top_p is None and min_p is None and
                     threshold is None and kept_tokens is None)
    if process_group is not None:
        from .distributed.vocab_parallel import log_prob as vocab_parallel

        if truncated:
            logits = _kept_shard(logits, None, None, temperature, top_k, top_p, min_p, threshold, kept_tokens,
                                 process_group)
        return vocab_parallel(logits, None, None, process_group, False)[1]
    check_logits(logits)
    lead = logits.shape[:-1]
    try:
        x = rows_of(logits)
        if truncated:
            f = filters(lead, temperature, top_k, top_p, min_p) or filters(lead, 1.0)
            if _native_kept(x):
                return kept_scores(x, None, None, f, threshold, ((lead.numel(), 0), lead), kept_tokens)[1]
            x, _ = kept_logits(x, f, threshold=threshold, kept_tokens=kept_tokens, with_mass=False)
        _, ent = rows_pair(x, None, None, ((lead.numel(), 0), lead))
    except (ValueError, IndexError) as e:
        raise type(e)(_status.unflatten_message(str(e), lead)) from None
    return ent


def _native_kept(x: Tensor) -> bool:
    """Whether the CPU kernels score the kept sets themselves (eager, CPU,
    checks not deferred); elsewhere the kept logits are formed and scored."""
    return x.device.type == "cpu" and not traced() and not device_errors.defers(x)


def _kept_shard(logits, actions, ignore_index, temperature, top_k, top_p, min_p, threshold, kept_tokens, group):
    """This rank's shard of the truncated logits (differentiable), with the
    global kept set; an action outside it raises on every rank."""
    from .distributed.truncation import check_kept_shard, kept_shard

    x, a, kept, error = None, None, None, None
    try:
        check_logits(logits, empty_ok=True)
        lead = logits.shape[:-1]
        x = rows_of(logits)
        f = filters(lead, temperature, top_k, top_p, min_p) or filters(lead, 1.0)
        if actions is not None:
            _checks.check_index_dtype(actions)
            a = actions.reshape(x.shape[0], actions_per_row(logits, actions))
        if threshold is not None:
            if kept_tokens is not None:
                raise ValueError("pass threshold or kept_tokens, not both")
            threshold = replayed_threshold(threshold, x.shape[0], _checks.stats_dtype(x.dtype), x.device)
        if kept_tokens is not None:
            kept = kept_token_ids(kept_tokens, x.shape[0], x.device)
    except (ValueError, TypeError, IndexError) as e:
        error, f = e, None
    z, _, layout = kept_shard(x, f, group, threshold=threshold, kept_tokens=kept, error=error)
    if a is not None:
        check_kept_shard(z, a, check_ignore_index(ignore_index), layout, group)
    return z.view(logits.shape[:-1] + (z.shape[-1],))
