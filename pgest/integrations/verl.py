"""verl on pgest's fused head: :func:`linear_cross_entropy` has the signature
and the semantics of verl's fused entry point
``verl.utils.kernel.linear_cross_entropy.linear_cross_entropy`` (what
``use_fused_kernels`` runs: log-probabilities and entropies of the labels
straight from the last hidden states and the head weight), on pgest's
native head instead of verl's Triton kernels, so it also runs on the CPU.

To plug it into verl (0.9.1: its fused forwards, ``forward_with_triton_backend``
in verl/models/transformers/dense_common.py and the vision-language models'
forwards, import the name from that module at each call, so rebinding it once
before training is enough)::

    import verl.utils.kernel.linear_cross_entropy as verl_lce
    from pgest.integrations import verl as pgest_verl

    verl_lce.linear_cross_entropy = pgest_verl.linear_cross_entropy

No part of verl is imported here.
"""
from __future__ import annotations

import numbers
from typing import Optional, Tuple

from torch import Tensor

from ..linear.head import linear_log_prob

REDUCTIONS = ("none", "sum", "mean")


def linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, temperature: float = 1.0,
                         reduction: Optional[str] = "none", dist_process_group=None) -> Tuple[Tensor, Tensor]:
    """log p(label) and the entropy of ``softmax(hidden @ weight.T /
    temperature)`` per token, without the logits, as verl's fused kernel
    gives them.

    Args:
        hidden: (..., H) hidden states (verl passes (batch, tokens, H));
            flattened to tokens.
        weight: (V, H) head weight, or this rank's contiguous rows of it
            with ``dist_process_group`` (verl's vocabulary-parallel layout).
        labels: token ids, one per hidden state (flattened alike); every
            label counts (no ignore index, as in verl).
        temperature: the logits are divided by it.
        reduction: ``"none"`` (per-token log-probs), ``"sum"`` or
            ``"mean"`` (of the log-probs over the tokens); the entropy is
            per token in every case, as verl's kernel returns it.
        dist_process_group: a ``torch.distributed`` group over which the
            head is split by vocabulary (see :func:`pgest.linear_log_prob`'s
            ``process_group``; hidden's gradient is summed over the group).

    Returns:
        ``(log_probs, entropy)``: log_probs (tokens,) or () and entropy
        (tokens,), float32 (float64 for float64 inputs; verl's kernel
        returns float32), differentiable with respect to hidden and weight.
    """
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
    if not isinstance(reduction, str) or reduction.lower() not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not isinstance(hidden, Tensor) or hidden.dim() < 1:
        raise TypeError("hidden must be a (..., H) tensor")
    if not isinstance(labels, Tensor) or labels.numel() * hidden.shape[-1] != hidden.numel():
        raise ValueError(f"labels must hold one id per hidden state: hidden {tuple(hidden.shape)}, labels "
                         f"{tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__}")
    try:
        lp, ent = linear_log_prob(hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1),
                                  temperature=float(temperature), ignore_index=None,
                                  process_group=dist_process_group)
    except (ValueError, IndexError) as e:  # the head calls them actions; verl, labels
        raise type(e)(str(e).replace("actions", "labels")) from None
    mode = reduction.lower()
    if mode == "sum":
        lp = lp.sum()
    elif mode == "mean":
        lp = lp.mean()
    return lp, ent
