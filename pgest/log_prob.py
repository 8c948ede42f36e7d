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

from . import _checks, _status
from ._checks import (
    actions_per_row,
    check_ignore_index,
    check_logits,
    index_tensor,
)
from .ops.log_prob import rows_of, rows_pair


class LogProb(NamedTuple):
    log_prob: Tensor  # log softmax(logits)[action], shape of actions
    entropy: Tensor   # (...,) entropy of softmax(logits) per row


def log_prob(logits: Tensor, actions: Tensor, *, ignore_index: Optional[int] = -100, process_group=None) -> LogProb:
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
    if process_group is not None:
        from .distributed.vocab_parallel import log_prob as vocab_parallel

        return LogProb(*vocab_parallel(logits, actions, ignore_index, process_group, True))
    check_logits(logits)
    S = actions_per_row(logits, actions)
    ii = check_ignore_index(ignore_index)
    _checks.check_device(actions, "actions", logits, "logits")
    lead = logits.shape[:-1]
    try:
        lp, ent = rows_pair(rows_of(logits), index_tensor(actions, logits.shape[-1]).reshape(-1, S), ii,
                            (actions.shape, lead))
    except (ValueError, IndexError) as e:
        raise type(e)(_status.unflatten_message(str(e), lead)) from None
    return LogProb(lp, ent)


def entropy(logits: Tensor, *, process_group=None) -> Tensor:
    """Differentiable entropy of ``softmax(logits)`` per row, (..., K) -> (...,),
    in one read of the logits (float32 for 16-bit logits). ``process_group``:
    vocabulary shards, as for :func:`log_prob`."""
    if process_group is not None:
        from .distributed.vocab_parallel import log_prob as vocab_parallel

        return vocab_parallel(logits, None, None, process_group, False)[1]
    check_logits(logits)
    lead = logits.shape[:-1]
    try:
        _, ent = rows_pair(rows_of(logits), None, None, ((lead.numel(), 0), lead))
    except (ValueError, IndexError) as e:
        raise type(e)(_status.unflatten_message(str(e), lead)) from None
    return ent
