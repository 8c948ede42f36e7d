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
import torch.distributions as td
from torch import Tensor
from torch.distributions import constraints

from . import _checks, _status
from ._checks import check_index_dtype, check_logits, index_tensor
from .log_prob import entropy as _entropy
from .log_prob import log_prob as _log_prob
from .ops.log_prob import rows_of, rows_pair
from .ops.sample import draw_rows
from .sample import sample as _sample


class ValueOutOfSupport(IndexError, ValueError):
    """An action outside [0, K): an IndexError as everywhere in pgest, and the
    ValueError torch's validated distributions raise for it."""


def _masked_log(probs: Tensor) -> Tensor:
    """log(probs) with -inf, and a zero gradient, where probs is 0: an action
    masked out by a zero probability is never drawn, and the gradient of the
    row stays finite (log's 1/p would turn the softmax's 0 into 0 * inf)."""
    live = probs > 0
    return torch.where(live, probs, torch.ones((), dtype=probs.dtype, device=probs.device)).log().masked_fill(
        ~live, float("-inf"))


class Categorical(td.Categorical):
    """Categorical distribution over the last dimension of ``logits``: a
    ``torch.distributions.Categorical`` (``isinstance`` holds, so
    ``MixtureSameFamily``, ``kl_divergence``, Stable-Baselines3's and
    TorchRL's checks accept it) whose work runs on pgest's kernels.

    Args:
        logits: (..., K) unnormalised log-probabilities; leading dimensions are
            the batch shape. Kept as given (no copy, no normalisation).
        probs: instead of logits, (..., K) non-negative weights (need not sum
            to 1); they are turned into ``log(probs)`` once, which does
            materialise a (..., K) tensor. A zero entry (action masking) is
            never drawn, has log-probability -inf and a finite gradient.
        temperature, top_k, top_p, min_p: the truncated, renormalised
            distribution :func:`pgest.sample` draws from with these
            parameters (definitions in :func:`pgest.truncation`): the logits
            become ``logits / temperature`` with -inf outside each row's kept
            set (differentiable; the set is a constant), so ``sample``,
            ``log_prob`` (-inf outside the set), ``entropy``, ``probs`` and
            ``kl_divergence`` all refer to it, and ``sample`` draws what
            ``pgest.sample`` draws for the same generator state;
            ``.truncation`` holds the record.
        validate_args: ``True`` checks the parameters at construction as
            torch does (one pass over them: ``ValueError`` for NaN logits,
            negative or all-zero probs). Whatever it is, pgest checks what it
            reads: an action outside [0, K) raises ``ValueOutOfSupport`` (an
            ``IndexError`` and a ``ValueError``), a NaN row ``ValueError``.

    Differences from ``torch.distributions.Categorical``:
      - samples come from pgest's Philox sampler (exact inverse CDF), so the
        same seed draws other actions than ``torch.multinomial``; the
        distribution is the same (tested by chi-square).
      - ``log_prob`` and ``entropy`` are float32 for 16-bit logits.
      - ``.logits`` and ``.probs`` are computed on first access (normalised,
        as torch's are), not at construction; with ``probs=`` a zero
        probability gives ``.logits`` -inf where torch clamps it to
        log(eps).
      - ``kl_divergence`` with another Categorical (pgest's or torch's) is
        registered; ``cdf``, ``icdf`` and ``rsample`` raise
        ``NotImplementedError`` as torch's do.
    """

    arg_constraints = {"probs": constraints.simplex, "logits": constraints.real_vector}
    has_enumerate_support = True
    has_rsample = False  # a categorical has no reparameterised sample
    _event_shape = torch.Size()

    # Fixed attributes: faster to set, read and free than the instance dict,
    # which counts when one object is made per step at RL sizes (the
    # Distribution base's own fields are properties below, read from the
    # logits: nothing to set for them).
    __slots__ = ("_given_probs", "_x", "_norm_probs", "_norm_logits", "_entropy", "_drawn", "_drawn_out", "_group",
                 "_truncation")

    def __init__(self, probs: Optional[Tensor] = None, logits: Optional[Tensor] = None,
                 validate_args: Optional[bool] = None, *, temperature=None, top_k=None, top_p=None, min_p=None,
                 process_group=None):
        if (probs is None) == (logits is None):
            raise ValueError("Either `probs` or `logits` must be specified, but not both.")
        given = probs if probs is not None else logits
        if isinstance(given, Tensor) and given.dim() < 1:
            raise ValueError(f"`{'probs' if probs is not None else 'logits'}` parameter must be at least "
                             "one-dimensional.")
        if probs is not None:
            check_logits(probs, "probs")
            if validate_args or (probs.numel() and bool((probs < 0).any())):
                _check_probs(probs)
            self._given_probs = probs
            logits = _masked_log(probs)
        else:
            check_logits(logits)
            if validate_args and bool(torch.isnan(logits).any()):
                raise ValueError("Expected parameter logits to satisfy the constraint RealVector(): it holds NaN")
            self._given_probs = None
        # The Distribution base is not initialised by its __init__: that would
        # read (and so build) the normalised parameters to validate them; its
        # fields are properties of the logits below.
        if validate_args is not None:
            self._validate_args = validate_args
        self._norm_probs = None
        self._x = logits
        self._norm_logits = None
        self._entropy = None
        self._drawn = None  # (stats, entropy, logits version) of the last sample()
        # (actions, their log-probs, entropy, its version) of the last
        # sample(): a log_prob of exactly those actions is already computed.
        self._drawn_out = None
        # torch.distributed group over which the vocabulary is split (each rank
        # holds its shard (..., K_r)); see pgest.log_prob.
        self._group = process_group
        self._truncation = None
        if not (temperature is None and top_k is None and top_p is None and min_p is None):
            self._truncate(temperature, top_k, top_p, min_p)

    def _truncate(self, temperature, top_k, top_p, min_p) -> None:
        """The truncated distribution is itself categorical: its logits are
        logits / temperature with -inf outside each row's kept set (one native
        pass, differentiable; pgest/truncation.py)."""
        from .truncation import filters, kept_logits

        x = self._x
        lead = x.shape[:-1]
        f = filters(lead, temperature, top_k, top_p, min_p)
        if self._group is not None:
            from .distributed.truncation import kept_shard

            z, self._truncation, _ = kept_shard(rows_of(x), f, self._group)
            self._truncation = type(self._truncation)(*(t.view(lead) for t in self._truncation))
        else:
            z, self._truncation = kept_logits(rows_of(x), f, lead=lead)
        self._x = z.view(lead + (x.shape[-1],))
        self._given_probs = None

    @property
    def truncation(self):
        """The :class:`~pgest.truncation.Truncation` record of the rows' kept
        sets when the distribution was built with temperature, top_k, top_p
        or min_p, else None."""
        return self._truncation

    def expand(self, batch_shape, _instance=None):
        """The same distribution broadcast to ``batch_shape`` (a view of the
        logits, no copy)."""
        batch_shape = torch.Size(batch_shape)
        K = self._x.shape[-1]
        try:
            x = self._x.expand(batch_shape + (K,))
        except RuntimeError as e:
            raise ValueError(f"cannot expand batch shape {tuple(self.batch_shape)} to {tuple(batch_shape)}: {e}") \
                from None
        new = type(self).__new__(type(self)) if _instance is None else _instance
        Categorical.__init__(new, logits=x, validate_args=False, process_group=self._group)
        new._validate_args = self._validate_args
        if self._truncation is not None:
            new._truncation = type(self._truncation)(*(t.expand(batch_shape) for t in self._truncation))
        if self._given_probs is not None:
            new._given_probs = self._given_probs.expand(batch_shape + (K,))
        return new

    # --- shapes, as torch.distributions ---------------------------------------
    @property
    def _batch_shape(self) -> torch.Size:
        return self._x.shape[:-1]

    @property
    def _num_events(self) -> int:
        return self._x.shape[-1]

    @property
    def _param(self) -> Tensor:
        return self._x if self._given_probs is None else self._given_probs

    @property
    def param_shape(self) -> torch.Size:
        return self._x.shape

    @property
    def num_events(self) -> int:
        return self._x.shape[-1]

    @constraints.dependent_property(is_discrete=True, event_dim=0)
    def support(self):
        return constraints.integer_interval(0, self._num_events - 1)

    # --- parameters, lazily ----------------------------------------------------
    @property
    def logits(self) -> Tensor:
        """Normalised log-probabilities (..., K), as torch's ``.logits``; built on
        first access."""
        self._whole_rows("logits")
        if self._norm_logits is None:
            self._norm_logits = torch.log_softmax(self._x, -1)
        return self._norm_logits

    @property
    def probs(self) -> Tensor:
        """Normalised probabilities (..., K), as torch's ``.probs``; built on
        first access."""
        self._whole_rows("probs")
        if self._norm_probs is None:
            self._norm_probs = (self._given_probs / self._given_probs.sum(-1, keepdim=True)
                                if self._given_probs is not None else torch.softmax(self._x, -1))
        return self._norm_probs

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

    @property
    def variance(self) -> Tensor:
        return self.mean

    @property
    def deterministic_sample(self) -> Tensor:
        """The mode (TorchRL's name for the action of a deterministic policy)."""
        return self.mode

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
                raise ValueError(_status.unflatten_message(str(e), batch)) from None
            if not (torch.compiler.is_compiling() or self._x.is_inference() or actions.is_inference()):
                # Reuse is keyed on tensor versions, which a traced graph has no
                # value for (under torch.compile log_prob takes the registered
                # op), nor inference tensors (a rollout under inference_mode).
                self._drawn = (stats, ent, self._x._version)
                self._drawn_out = (actions, lp, ent, actions._version)
            return actions
        shape = torch.Size(sample_shape)
        n = shape.numel()
        if n == 0:  # an empty sample_shape product: no draw (and no seed taken)
            return torch.empty(shape + self.batch_shape, dtype=torch.int64, device=self._x.device)
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
        value = _as_actions(value)
        _checks.check_device(value, "value", self._x, "logits")
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
                raise _value_error(e, batch) from None
            return lp
        try:
            shape = torch.broadcast_shapes(value.shape, batch)
        except RuntimeError:
            raise ValueError(f"value of shape {tuple(value.shape)} does not broadcast against the batch "
                             f"shape {tuple(batch)}") from None
        rows = shape[len(shape) - nb:]  # the batch, or the batch broadcast up where it has 1s
        lead = shape[:len(shape) - nb]
        x = self._x if rows == batch else self._x.expand(rows + self._x.shape[-1:])
        v = value.expand(shape).reshape((lead.numel(),) + rows)
        try:
            out = _log_prob(x, v.movedim(0, -1), ignore_index=None)  # (..., n): n values of each row
        except (ValueError, IndexError) as e:
            raise _value_error(e, rows) from None
        if rows == batch:
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
        name = "probs" if self._given_probs is not None else "logits"
        p = self._param
        return f"{type(self).__name__}({name}: {p if p.numel() == 1 else p.size()})"


def _check_probs(probs: Tensor) -> None:
    """torch's constraints on probs (non-negative, finite, a positive sum per
    row) as ValueErrors naming the argument."""
    if bool((probs < 0).any()):
        raise ValueError("probs must be non-negative")
    if not bool(torch.isfinite(probs).all()):
        raise ValueError("probs must be finite")
    if probs.numel() and not bool((probs.sum(-1) > 0).all()):
        raise ValueError("probs must have a positive sum in every row")


def _as_actions(value) -> Tensor:
    """Integer actions from what torch's Categorical accepts: integer tensors,
    and float tensors holding whole numbers (Stable-Baselines3's buffers)."""
    if isinstance(value, Tensor) and (value.dtype.is_floating_point or value.dtype == torch.bool):
        if value.dtype.is_floating_point and value.numel() and not bool((value == value.trunc()).all()):
            raise ValueOutOfSupport("value must hold whole numbers (action indices), got a fractional or NaN entry")
        return value.to(torch.int64)
    check_index_dtype(value, "value")
    return value


def _value_error(e: Exception, batch) -> Exception:
    """A kernel's error in the caller's terms: ``value[...]`` at the caller's
    indices; an action out of range is a ValueOutOfSupport."""
    msg = _status.unflatten_message(str(e), batch)
    msg = "value" + msg[len("actions"):] if msg.startswith("actions[") else msg
    return ValueOutOfSupport(msg) if isinstance(e, IndexError) else type(e)(msg)


# ---- kl_divergence -------------------------------------------------------------------

def _kl_logits(p_logits: Tensor, q_logits: Tensor) -> Tensor:
    """KL(p || q) per row from two (normalised) log-probability tensors:
    0 where p is 0 (whatever q holds), inf where q is 0 and p is not."""
    pp = p_logits.exp()
    live = pp > 0
    d = torch.where(live, p_logits - q_logits, torch.zeros((), dtype=pp.dtype, device=pp.device))  # no -inf - -inf
    return (pp * d).sum(-1)


@td.register_kl(Categorical, Categorical)
def _kl_pgest_pgest(p, q):
    return _kl_logits(p.logits, q.logits)


@td.register_kl(Categorical, td.Categorical)
def _kl_pgest_torch(p, q):
    return _kl_logits(p.logits, q.logits)


@td.register_kl(td.Categorical, Categorical)
def _kl_torch_pgest(p, q):
    return _kl_logits(p.logits, q.logits)
