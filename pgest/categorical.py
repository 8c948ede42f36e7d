"""pgest.Categorical: a drop-in for ``torch.distributions.Categorical`` in
policy-gradient agents, on pgest's kernels.

Constructing one costs nothing: torch's class normalises the logits into a new
(rows, K) tensor at once; this one keeps the caller's logits and computes what
is asked, when it is asked. ``log_prob(actions)`` computes the entropy in the
same pass over the logits and keeps it, so ``entropy()`` afterwards is free and
both outputs reach the logits through one fused backward (the order agents use:
CleanRL's and Stable-Baselines3's PPO call ``log_prob`` then ``entropy``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _native as nat
from .log_prob import (check_index_dtype, check_logits, entropy as _entropy, index_tensor, log_prob as _log_prob,
                       rows_of, rows_pair)
from .sample import draw_rows, sample as _sample


class Categorical:
    """Categorical distribution over the last dimension of ``logits``.

    Args:
        logits: (..., K) unnormalised log-probabilities; leading dimensions are
            the batch shape. Kept as given (no copy, no normalisation).
        probs: instead of logits, (..., K) non-negative weights (need not sum
            to 1); they are turned into ``probs.log()`` once, which does
            materialise a (..., K) tensor.
        validate_args: accepted for compatibility; pgest always validates
            (bad actions raise ``IndexError``, NaN rows ``ValueError``).

    Differences from ``torch.distributions.Categorical``:
      - samples come from pgest's Philox sampler (exact inverse CDF), so the
        same seed draws other actions than ``torch.multinomial``; the
        distribution is the same (tested by chi-square).
      - ``log_prob`` and ``entropy`` are float32 for 16-bit logits.
      - ``.logits`` and ``.probs`` are computed on first access (normalised,
        as torch's are), not at construction.
      - ``expand``, ``enumerate_support``, ``cdf``-style methods and
        ``torch.distributions.kl_divergence`` registration are not provided.
    """

    # Fixed attributes: faster to set, read and free than an instance dict,
    # which counts when one object is made per step at RL sizes.
    __slots__ = ("_given_probs", "_probs", "_x", "_logits", "_entropy", "_drawn", "_drawn_out", "_group")

    has_enumerate_support = True
    has_rsample = False  # a categorical has no reparameterised sample
    arg_constraints = {}

    def __init__(self, probs: Optional[Tensor] = None, logits: Optional[Tensor] = None,
                 validate_args: Optional[bool] = None, *, process_group=None):
        if (probs is None) == (logits is None):
            raise ValueError("pass exactly one of probs and logits")
        if probs is not None:
            check_logits(probs, "probs")
            if probs.dtype.is_floating_point and probs.numel() and bool((probs < 0).any()):
                raise ValueError("probs must be non-negative")
            self._given_probs = probs
            logits = probs.log()
        else:
            check_logits(logits)
            self._given_probs = None
        self._probs = None
        self._x = logits
        self._logits = None
        self._entropy = None
        self._drawn = None  # (stats, entropy, logits version) of the last sample()
        # (actions, their log-probs, entropy, its version) of the last
        # sample(): a log_prob of exactly those actions is already computed.
        self._drawn_out = None
        # torch.distributed group over which the vocabulary is split (each rank
        # holds its shard (..., K_r)); see pgest.log_prob.
        self._group = process_group

    # --- shapes, as torch.distributions ---------------------------------------
    @property
    def batch_shape(self) -> torch.Size:
        return self._x.shape[:-1]

    @property
    def event_shape(self) -> torch.Size:
        return torch.Size()

    @property
    def param_shape(self) -> torch.Size:
        return self._x.shape

    @property
    def num_events(self) -> int:
        return self._x.shape[-1]

    # --- parameters, lazily ----------------------------------------------------
    @property
    def logits(self) -> Tensor:
        """Normalised log-probabilities (..., K), as torch's ``.logits``; built on
        first access."""
        self._whole_rows("logits")
        if self._logits is None:
            self._logits = torch.log_softmax(self._x, -1)
        return self._logits

    @property
    def probs(self) -> Tensor:
        """Normalised probabilities (..., K), as torch's ``.probs``; built on
        first access."""
        self._whole_rows("probs")
        if self._probs is None:
            self._probs = (self._given_probs / self._given_probs.sum(-1, keepdim=True)
                           if self._given_probs is not None else torch.softmax(self._x, -1))
        return self._probs

    @property
    def mode(self) -> Tensor:
        """The most probable action of each row (first of ties), without a softmax."""
        self._whole_rows("mode")
        return self._x.argmax(-1)

    def _whole_rows(self, what: str) -> None:
        if self._group is not None:
            raise NotImplementedError(f"Categorical.{what} needs whole rows; with a process_group each rank holds a "
                                      "vocabulary shard (sample, log_prob and entropy work across ranks)")

    @property
    def mean(self) -> Tensor:
        return torch.full(self.batch_shape, float("nan"), dtype=self._x.dtype, device=self._x.device)

    variance = mean

    # --- sampling ---------------------------------------------------------------
    def sample(self, sample_shape=torch.Size(), *, num_samples: Optional[int] = None,
               generator: Optional[torch.Generator] = None) -> Tensor:
        """Draw actions (int64, no gradient).

        ``sample()`` gives ``batch_shape``; ``sample(sample_shape)`` gives
        ``sample_shape + batch_shape`` as torch does; ``sample(num_samples=S)``
        gives ``batch_shape + (S,)``, pgest's layout (S draws of each row,
        what ``log_prob`` takes directly)."""
        if self._group is not None:
            if tuple(sample_shape):
                raise NotImplementedError("with a process_group, sample() takes num_samples=, not a sample_shape")
            s = _sample(self._x, num_samples or 1, generator, process_group=self._group).actions
            return s if num_samples is None or num_samples > 1 else s.unsqueeze(-1)
        if num_samples is not None:
            if tuple(sample_shape):
                raise ValueError("pass either sample_shape or num_samples, not both")
            s = _sample(self._x, num_samples, generator).actions
            return s if num_samples > 1 else s.unsqueeze(-1)
        if isinstance(sample_shape, (tuple, list)) and not sample_shape:
            # Keep the draw's row statistics: a log_prob of these logits then
            # needs no second pass over them (one native pass per step).
            batch = self._x.shape[:-1]
            try:
                actions, lp, ent, stats = draw_rows(rows_of(self._x.detach()), 1, generator, (batch, batch))
            except ValueError as e:
                raise ValueError(nat.unflatten_message(str(e), batch)) from None
            if not torch.compiler.is_compiling():
                # Reuse is keyed on tensor versions, which a traced graph has no
                # value for: under torch.compile log_prob takes the registered op.
                self._drawn = (stats, ent, self._x._version)
                self._drawn_out = (actions, lp, ent, actions._version)
            return actions
        shape = torch.Size(sample_shape)
        n = shape.numel()
        a = _sample(self._x, n, generator).actions if n > 1 else _sample(self._x, 1, generator).actions.unsqueeze(-1)
        # (..., n) -> (n, ...) -> sample_shape + batch_shape
        a = a.movedim(-1, 0) if a.dim() > 1 else a
        return a.reshape(shape + self.batch_shape)


    # --- log-probabilities and entropy ---------------------------------------------
    def log_prob(self, value: Tensor) -> Tensor:
        """log p(value), differentiable. ``value`` of ``batch_shape``, or of
        ``sample_shape + batch_shape`` (broadcast as torch does)."""
        out = self._drawn_out
        if out is not None and value is out[0] and value._version == out[3] and self._drawn[2] == self._x._version:
            # The very actions sample() drew from the unchanged logits: their
            # log-probs and the entropy came with the draw; only the autograd
            # node is new. Once: those tensors become this call's outputs.
            stats, ent, _ = self._drawn
            self._drawn_out = None  # a later call reuses only (stats, ent), through the kernels
            batch = value.shape
            lp, self._entropy = rows_pair(rows_of(self._x), value.view(-1, 1), None, (batch, batch),
                                          given=(stats, ent), outputs=out[1:3])
            return lp
        check_index_dtype(value, "value")
        nat.check_device(value, "value", self._x, "logits")
        batch = self.batch_shape
        nb = len(batch)
        if self._group is not None:
            out = _log_prob(self._x, value, ignore_index=None, process_group=self._group)
            self._entropy = out.entropy
            return out.log_prob
        if value.shape == batch:
            # One action per row (the PPO update's pattern): straight to the
            # kernels, with the statistics of this object's sample() of the
            # unchanged logits when there are some (then the rows are not read).
            drawn = self._drawn
            given = (drawn[:2] if drawn is not None and value.numel() and not torch.compiler.is_compiling()
                     and drawn[2] == self._x._version else None)
            x = rows_of(self._x)
            try:
                lp, self._entropy = rows_pair(x, index_tensor(value, x.shape[1], "value").reshape(-1, 1), None,
                                              (batch, batch), given=given)
            except (ValueError, IndexError) as e:
                msg = nat.unflatten_message(str(e), batch)
                raise type(e)("value" + msg[len("actions"):] if msg.startswith("actions[") else msg) from None
            return lp
        shape = torch.broadcast_shapes(value.shape, batch)
        if shape[len(shape) - nb:] != batch:
            raise ValueError(f"value of shape {tuple(value.shape)} does not broadcast against the batch "
                             f"shape {tuple(batch)}")
        lead = shape[:len(shape) - nb]
        v = value.expand(shape).reshape((lead.numel(),) + batch)
        out = _log_prob(self._x, v.movedim(0, -1), ignore_index=None)  # (..., n): n values of each row
        self._entropy = out.entropy
        return out.log_prob.movedim(-1, 0).reshape(shape)

    def entropy(self) -> Tensor:
        """Entropy per row, differentiable; free after ``log_prob`` (same pass,
        same backward)."""
        e = self._entropy
        if e is None or (not e.requires_grad and self._x.requires_grad and torch.is_grad_enabled()):
            e = self._entropy = _entropy(self._x, process_group=self._group)
        return e

    def perplexity(self) -> Tensor:
        return torch.exp(self.entropy())

    def enumerate_support(self, expand: bool = True) -> Tensor:
        K = self.num_events
        values = torch.arange(K, dtype=torch.long, device=self._x.device)
        values = values.view((-1,) + (1,) * len(self.batch_shape))
        return values.expand((-1,) + self.batch_shape) if expand else values

    def __repr__(self) -> str:
        return f"pgest.Categorical(logits: {tuple(self._x.shape)} {self._x.dtype})"
