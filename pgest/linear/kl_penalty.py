"""The KL penalty to a reference policy from the two models' hidden states and
heads, without either's logits: the policy's log-probabilities of the sampled
tokens by the fused head (differentiable), the reference's by the same head
with no gradient, and the per-token estimate of KL(pi || pi_ref) from them
(:func:`pgest.objectives.kl_penalty`: k1, k2, k3)."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ..objectives import KL_ESTIMATORS, kl_penalty
from .head import linear_log_prob


class LinearKLPenalty(NamedTuple):
    kl: Tensor            # (...,): the estimate per token (0 where ignored)
    log_prob: Tensor      # the policy's log-probabilities of the tokens
    entropy: Tensor       # the policy's entropy per token
    ref_log_prob: Tensor  # the reference's (no gradient)


def linear_kl_penalty(hidden: Tensor, weight: Tensor, ref_hidden: Tensor, ref_weight: Tensor, actions: Tensor, *,
                      bias: Optional[Tensor] = None, ref_bias: Optional[Tensor] = None, estimator: str = "k3",
                      temperature: float = 1.0, ignore_index: Optional[int] = -100, softcap=None,
                      ref_softcap=None, token_tile: Optional[int] = None,
                      vocab_tile: Optional[int] = None) -> LinearKLPenalty:
    """Per-token KL(pi || pi_ref) estimates of the sampled ``actions`` for a
    policy head ``(hidden, weight, bias)`` and a reference head
    ``(ref_hidden, ref_weight, ref_bias)`` (the reference model's own last
    hidden states and output embedding), neither's (tokens, V) logits built.

    With ``delta = ref_log_prob - log_prob``: ``k1`` = -delta, ``k2`` =
    delta^2 / 2, ``k3`` = exp(delta) - delta - 1 (Schulman 2020; GRPO's
    choice, TRL's ``beta`` term). Both heads score the tokens under the same
    ``temperature`` (as TRL and verl do); ``softcap`` / ``ref_softcap``: each
    model's final logit soft-capping. Differentiable with respect to the
    policy's hidden states, weight and bias; the reference gets no gradient
    (its pass runs under ``torch.no_grad``). Tokens equal to
    ``ignore_index`` give 0 everywhere. Two passes over the vocabulary, one
    per head; each as :func:`pgest.linear_log_prob` makes it.

    Returns:
        ``LinearKLPenalty(kl, log_prob, entropy, ref_log_prob)``: add ``beta *``
        an aggregate of ``kl`` to the loss, and use ``log_prob`` (and
        ``entropy``) for the policy-gradient terms of the same step.
    """
    if estimator not in KL_ESTIMATORS:  # before either pass
        raise ValueError(f"estimator must be one of {', '.join(KL_ESTIMATORS)}; got {estimator!r}")
    if not isinstance(ref_hidden, Tensor) or not isinstance(hidden, Tensor):
        raise TypeError("hidden and ref_hidden must be tensors")
    if ref_hidden.shape[:-1] != hidden.shape[:-1]:
        raise ValueError(f"ref_hidden must hold the same tokens as hidden: leading shape {tuple(hidden.shape[:-1])}, "
                         f"got {tuple(ref_hidden.shape[:-1])}")
    tiles = dict(token_tile=token_tile, vocab_tile=vocab_tile, ignore_index=ignore_index, temperature=temperature)
    lp, ent = linear_log_prob(hidden, weight, actions, bias=bias, softcap=softcap, **tiles)
    with torch.no_grad():
        ref_lp, _ = linear_log_prob(ref_hidden, ref_weight, actions, bias=ref_bias, softcap=ref_softcap, **tiles)
    # an ignored token has log_prob 0 under both heads: its estimate is 0, with no gradient
    return LinearKLPenalty(kl_penalty(lp, ref_lp, estimator), lp, ent, ref_lp)
