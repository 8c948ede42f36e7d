"""Policy-gradient objectives over per-token log-probabilities.

Everything here is elementwise over (rows,) or (rows, T) tensors (T tokens or
samples per row; a (rows,) tensor is rows sequences of one token), so it
composes with :func:`pgest.log_prob`, :class:`pgest.Categorical`, the
logits-level ops, or any other source of log-probabilities: autograd carries
the per-token gradients back to whatever produced them, and pgest's fused
backward turns them into the logits' gradient in one pass.

Notation: ``lp`` the current log-probabilities (differentiable), ``old`` the
log-probabilities when the data was collected, ``A`` advantages, ``m`` the
mask (1 for a token that counts), ``r = exp(lp - old)`` the importance ratio.
"""
from __future__ import annotations

import numbers
from typing import Dict, Optional, Tuple, Union

import torch
from torch import Tensor

AGGREGATIONS = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "k2", "k3")


def _check_like(t, ref: Tensor, name: str, floating: bool = True) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if floating and not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be a float tensor, got {t.dtype}")
    if t.shape != ref.shape:
        raise ValueError(f"{name} must have shape {tuple(ref.shape)} like log_prob, got {tuple(t.shape)}")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but log_prob is on {ref.device}")


def _mask_of(mask: Optional[Tensor], ref: Tensor) -> Optional[Tensor]:
    """The mask as booleans (None: every token counts). Masked positions are
    selected out with ``torch.where``, never multiplied by 0: a NaN or an
    overflowed ratio there (padding, sampler log-probs of -100) would turn
    0 * inf into NaN in the loss and in the gradient."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    _check_like(mask, ref, "mask", floating=False)
    return mask if mask.dtype == torch.bool else mask != 0


def _acc_dtype(t: Tensor) -> torch.dtype:
    """Counts and sums of 16-bit values run in float32 (as torch.mean does):
    70,000 float16 tokens overflow a float16 count."""
    return torch.promote_types(t.dtype, torch.float32)


def _select(values: Tensor, m: Optional[Tensor]) -> Tensor:
    """values where the mask holds, 0 elsewhere (gradient 0 there too)."""
    if m is None:
        return values
    return torch.where(m, values, torch.zeros((), dtype=values.dtype, device=values.device))


def _masked_mean(values: Tensor, m: Optional[Tensor]) -> Tensor:
    """Mean of ``values`` over the tokens that count, in the accumulation
    type; 0 when none does (no NaN)."""
    acc = _acc_dtype(values)
    v = _select(values, m).to(acc)
    count = v.numel() if m is None else m.sum()
    return v.sum() / (max(count, 1) if m is None else count.clamp_min(1).to(acc))


def _tokens_2d(t: Tensor) -> Tensor:
    if t.dim() == 1:
        return t.unsqueeze(-1)
    if t.dim() == 2:
        return t
    raise ValueError(f"expected (rows,) or (rows, T) per-token values, got shape {tuple(t.shape)}")


def aggregate(values: Tensor, mask: Optional[Tensor] = None, mode: str = "token-mean",
              normalizer: Optional[float] = None, *, process_group=None) -> Tensor:
    """Reduce per-token values ``l`` (rows,) or (rows, T) to a scalar loss.

    Modes (names as in verl and TRL), with ``n`` rows (sequences) and ``m`` the mask:

      - ``token-mean``: sum(l m) / sum(m) (DAPO, Yu et al. 2025: every token
        weighs the same). ``normalizer``: the token count to divide by instead,
        e.g. the global count across data-parallel ranks.
      - ``seq-mean-token-sum``: (1/n) sum_i sum_t l_it m_it. ``normalizer``
        replaces n.
      - ``seq-mean-token-mean``: (1/n) sum_i [sum_t l_it m_it / sum_t m_it]
        (GRPO, Shao et al. 2024). A row with no token counts as 0 in the mean.
        ``normalizer`` replaces n.
      - ``seq-mean-token-sum-norm``: (1/n) sum_i sum_t l_it m_it / L with a
        constant L (Dr. GRPO, Liu et al. 2025: no length bias). L is
        ``normalizer``, or T (the padded length) when it is None; with a
        ``process_group`` T is the longest padded length over the ranks.

    An unknown mode, a non-positive normalizer, or a mask of another shape raises.

    Masked positions are selected out, never multiplied by 0: NaN or inf
    there does not reach the loss or the gradient. With every token masked
    the loss is 0 and the gradients are zero (no 0 / 0). Counts and sums run
    in float32 for 16-bit values (as ``torch.mean``); the loss has the dtype
    of ``values``.

    Where peers define a mode differently (same names, other numbers): verl's
    ``seq-mean-token-sum-norm`` divides by L alone (pgest, TRL's Dr. GRPO:
    by n x L); verl's ``seq-mean-token-mean`` leaves rows with no valid
    token out of n (pgest, TRL and Liger-Kernel count them, as 0).

    ``process_group`` (data parallel): each rank passes its own rows; the token
    and sequence counts are summed over the group (one all_reduce of two
    numbers) and the loss is scaled by the group size, so that after DDP
    averages the gradients over ranks the update is the one of a single
    process holding every rank's rows. The loss each rank returns is its
    share times the group size (their mean over ranks is the whole-batch
    loss). Pass either ``normalizer`` or ``process_group``.
    """
    if mode not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {', '.join(AGGREGATIONS)}; got {mode!r}")
    if not isinstance(values, Tensor) or not values.dtype.is_floating_point:
        raise TypeError("values must be a float tensor")
    m = _mask_of(mask, values)
    if normalizer is not None:
        if isinstance(normalizer, bool) or not isinstance(normalizer, (numbers.Real, Tensor)):
            raise TypeError(f"normalizer must be a number, got {type(normalizer).__name__}")
        if not isinstance(normalizer, Tensor) and not normalizer > 0:
            raise ValueError(f"normalizer must be > 0, got {normalizer}")
    acc = _acc_dtype(values)
    l2 = _tokens_2d(values)
    m2 = (torch.ones(l2.shape, dtype=torch.bool, device=l2.device) if m is None else _tokens_2d(m))
    masked = _select(l2, m2).to(acc)
    if process_group is not None:
        if normalizer is not None and mode != "seq-mean-token-sum-norm":
            raise ValueError("pass either normalizer or process_group: with a group the counts are global already")
        return _aggregate_global(l2, m2, masked, mode, normalizer, process_group).to(values.dtype)
    return _aggregate_local(l2, m2, masked, mode, normalizer).to(values.dtype)


def _aggregate_local(l2: Tensor, m2: Tensor, masked: Tensor, mode: str, normalizer) -> Tensor:
    acc = masked.dtype
    if mode == "token-mean":
        # every token masked: loss 0 and zero gradients, as the other modes give
        den = m2.sum().clamp_min(1).to(acc) if normalizer is None else normalizer
        return masked.sum() / den
    # no row at all: 0, not 0 / 0 (a given normaliser is > 0 already)
    n = max(l2.shape[0], 1) if normalizer is None or mode == "seq-mean-token-sum-norm" else normalizer
    if mode == "seq-mean-token-sum":
        return masked.sum() / n
    if mode == "seq-mean-token-mean":
        per_seq = masked.sum(-1) / m2.sum(-1).clamp_min(1).to(acc)
        return per_seq.sum() / n
    L = max(l2.shape[1], 1) if normalizer is None else normalizer
    return masked.sum() / (n * L)


def _aggregate_global(l2: Tensor, m2: Tensor, masked: Tensor, mode: str, normalizer, group) -> Tensor:
    import torch.distributed as dist

    world = dist.get_world_size(group)
    acc = masked.dtype
    # a fill, not torch.tensor: no host-to-device copy (a synchronisation on CUDA)
    counts = torch.stack([m2.sum().double(), torch.full((), float(l2.shape[0]), dtype=torch.float64,
                                                        device=l2.device)])
    dist.all_reduce(counts, group=group)
    # an empty group (no row, or no token, on every rank) gives 0, not 0 / 0
    tokens, rows = counts[0].clamp_min(1).to(acc), counts[1].clamp_min(1).to(acc)
    if mode == "token-mean":
        return masked.sum() * world / tokens
    if mode == "seq-mean-token-sum":
        return masked.sum() * world / rows
    if mode == "seq-mean-token-mean":
        per_seq = masked.sum(-1) / m2.sum(-1).clamp_min(1).to(acc)
        return per_seq.sum() * world / rows
    if normalizer is None:
        # one process holding every rank's rows pads them to the longest:
        # divide by that length, agreed over the group (a rank's own padded
        # length differs from it whenever the ranks' batches do)
        length = torch.full((), float(l2.shape[1]), dtype=torch.float64, device=l2.device)
        dist.all_reduce(length, op=dist.ReduceOp.MAX, group=group)
        L = length.to(acc)
    else:
        L = normalizer
    return masked.sum() * world / (rows * L)


def _clip_range(clip) -> Tuple[float, float]:
    if isinstance(clip, (tuple, list)):
        if len(clip) != 2:
            raise ValueError(f"clip must be a float or (low, high), got {clip!r}")
        low, high = clip
    else:
        low = high = clip
    for v, name in ((low, "low"), (high, "high")):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0 <= v < float("inf"):
            raise ValueError(f"clip {name} must be a finite number >= 0, got {v!r}")
    if low >= 1:
        raise ValueError(f"clip low must be < 1 (the ratio is clipped to [1 - low, 1 + high]), got {low}")
    return float(low), float(high)


def ppo_loss(log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, *,
             clip: Union[float, Tuple[float, float]] = 0.2, dual_clip: Optional[float] = None,
             mask: Optional[Tensor] = None, aggregation: str = "token-mean",
             normalizer: Optional[float] = None, process_group=None) -> Tuple[Tensor, Dict[str, Tensor]]:
    """The clipped surrogate of PPO (Schulman et al. 2017), per token:

        l = max(-A r, -A clip(r, 1 - low, 1 + high)),   r = exp(lp - old)

    ``clip`` = eps or (low, high) (asymmetric, DAPO's clip-higher). With
    ``dual_clip`` = c > 1 (Ye et al. 2020), tokens with A < 0 are also bounded:
    l = min(l, -A c). Reduced by :func:`aggregate` (``aggregation``, ``mask``,
    ``normalizer``). GRPO is this loss with group-normalised advantages
    (:func:`pgest.baselines.group_normalize`) and ``seq-mean-token-mean``.

    Returns ``(loss, metrics)``; metrics, detached, over the tokens that count:
    ``clip_fraction`` (share of tokens where clipping changed the loss),
    ``approx_kl`` (k3 estimate of KL(old || new): mean of (r - 1) - log r),
    ``ratio_mean``, and ``dual_clip_fraction`` when dual clipping is on.
    """
    if not isinstance(log_prob, Tensor) or not log_prob.dtype.is_floating_point:
        raise TypeError("log_prob must be a float tensor")
    _check_like(old_log_prob, log_prob, "old_log_prob")
    _check_like(advantages, log_prob, "advantages")
    low, high = _clip_range(clip)
    if dual_clip is not None and (isinstance(dual_clip, bool) or not isinstance(dual_clip, numbers.Real)
                                  or not 1 < dual_clip < float("inf")):
        raise ValueError(f"dual_clip must be a finite number > 1, got {dual_clip!r}")
    m = _mask_of(mask, log_prob)
    # masked tokens enter as log-ratio 0 and advantage 0: whatever they hold
    # (NaN padding, an old log-prob of -100 whose ratio overflows) reaches
    # neither the loss nor the gradient
    adv = _select(advantages.detach(), m)
    log_ratio = _select(log_prob - old_log_prob.detach(), m)
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - low, 1.0 + high)
    loss = torch.maximum(unclipped, clipped)
    metrics = {}
    with torch.no_grad():
        metrics["clip_fraction"] = _masked_mean((clipped > unclipped).to(log_prob.dtype), m)
        lr = log_ratio.detach()
        metrics["approx_kl"] = _masked_mean(torch.expm1(lr) - lr, m)
        metrics["ratio_mean"] = _masked_mean(ratio.detach(), m)
    if dual_clip is not None:
        bound = -adv * dual_clip
        dual = (adv < 0) & (loss > bound)
        loss = torch.where(dual, bound, loss)
        with torch.no_grad():
            metrics["dual_clip_fraction"] = _masked_mean(dual.to(log_prob.dtype), m)
    return aggregate(loss, m, aggregation, normalizer, process_group=process_group), metrics


GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo")


def _positive(v, name: str, allow_none: bool = False) -> Optional[float]:
    if v is None and allow_none:
        return None
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0 < v < float("inf"):
        raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
    return float(v)


def grpo_loss(log_prob: Tensor, old_log_prob: Optional[Tensor], advantages: Tensor, mask: Optional[Tensor] = None,
              *, loss_type: str = "dapo", importance_sampling_level: str = "token", epsilon: float = 0.2,
              epsilon_high: Optional[float] = None, delta: Optional[float] = None, beta: float = 0.0,
              ref_log_prob: Optional[Tensor] = None, sapo_temperature_pos: float = 1.0,
              sapo_temperature_neg: float = 1.05, max_completion_length: Optional[int] = None,
              num_items_in_batch=None) -> Tuple[Tensor, Dict[str, Tensor]]:
    """The GRPO family under TRL's names and with TRL's definitions
    (``GRPOTrainer._compute_loss`` of TRL 1.16, one process, no gradient
    accumulation), on (B, T) per-token log-probabilities of B completions.

    With r = exp(lp - old) per token (``importance_sampling_level="token"``)
    or r = exp(masked mean of lp - old over the sequence) per sequence
    (``"sequence"``, GSPO: Zheng et al. 2025), A the advantages ((B,) or
    (B, T)), eps_low = ``epsilon``, eps_high = ``epsilon_high`` (default
    ``epsilon``; DAPO's clip-higher, Yu et al. 2025), the per-token loss:

    - grpo, bnpo, dr_grpo, dapo, luspo: -min(r' A, clip(r, 1 - eps_low,
      1 + eps_high) A), r' = min(r, ``delta``) when delta is set (the
      two-sided clip of INTELLECT-2);
    - cispo: -sg(min(r, eps_high)) A lp (MiniMax-M1, 2025: the clipped
      ratio as a stopped weight of the REINFORCE term);
    - sapo: -(4 / t) sigmoid(t (r - 1)) A, t = ``sapo_temperature_pos``
      where A > 0 else ``sapo_temperature_neg`` (a soft gate for the clip);

    plus ``beta`` * k3(ref || lp) = exp(ref - lp) - (ref - lp) - 1 per token
    (Shao et al. 2024) when beta != 0. Aggregated over the mask as TRL
    does: grpo and sapo: mean over sequences of each sequence's token mean
    (Shao et al. 2024); bnpo: over all tokens; dr_grpo: sum over tokens /
    (B * ``max_completion_length``) (Liu et al. 2025); dapo and cispo: sum
    over tokens / ``num_items_in_batch`` (the generation batch's completion
    tokens; default: this batch's); luspo: mean over sequences of each
    sequence's token sum. ``old_log_prob`` None: the on-policy case (lp
    detached).

    Returns ``(loss, metrics)``: TRL's logged figures (``kl``;
    ``clip_ratio/low_mean``, ``high_mean``, ``region_mean``: shares of
    tokens (sequences at sequence level) whose ratio was clipped on the side
    its advantage makes active; ``clip_ratio/low_min``, ``high_max``:
    extremes of the per-sequence shares; ``cispo_clip_ratio``) and the raw
    ratio before any clipping (``ratio_mean``, ``ratio_min``, ``ratio_max``).
    Masked tokens are selected out, never multiplied by 0 (a NaN there
    reaches neither loss nor gradient). The ``vespo`` loss is not provided.
    """
    if not isinstance(log_prob, Tensor) or not log_prob.dtype.is_floating_point or log_prob.dim() != 2:
        raise TypeError("log_prob must be a (completions, tokens) float tensor")
    if loss_type == "vespo":
        raise NotImplementedError("grpo_loss: loss_type='vespo' is not provided")
    if loss_type not in GRPO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {GRPO_LOSS_TYPES}, got {loss_type!r}")
    if importance_sampling_level not in ("token", "sequence"):
        raise ValueError(f"importance_sampling_level must be 'token' or 'sequence', got {importance_sampling_level!r}")
    if isinstance(epsilon, bool) or not isinstance(epsilon, numbers.Real) or not 0 <= epsilon < 1:
        raise ValueError(f"epsilon must be a number in [0, 1), got {epsilon!r}")
    eps_high = float(epsilon) if epsilon_high is None else _positive(epsilon_high, "epsilon_high")
    delta = _positive(delta, "delta", allow_none=True)
    t_pos, t_neg = _positive(sapo_temperature_pos, "sapo_temperature_pos"), \
        _positive(sapo_temperature_neg, "sapo_temperature_neg")
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not abs(beta) < float("inf"):
        raise ValueError(f"beta must be a finite number, got {beta!r}")
    old = log_prob.detach() if old_log_prob is None else old_log_prob
    _check_like(old, log_prob, "old_log_prob")
    if beta != 0:
        if ref_log_prob is None:
            raise ValueError("beta != 0 needs ref_log_prob (the reference policy's per-token log-probs)")
        _check_like(ref_log_prob, log_prob, "ref_log_prob")
    if not isinstance(advantages, Tensor) or not advantages.dtype.is_floating_point:
        raise TypeError("advantages must be a float tensor")
    if advantages.shape not in (log_prob.shape[:1], log_prob.shape):
        raise ValueError(f"advantages must have shape ({log_prob.shape[0]},) or {tuple(log_prob.shape)}, got "
                         f"{tuple(advantages.shape)}")
    if loss_type == "dr_grpo" and (isinstance(max_completion_length, bool) or
                                   not isinstance(max_completion_length, int) or max_completion_length < 1):
        raise ValueError(f"loss_type='dr_grpo' needs max_completion_length, an int >= 1, got "
                         f"{max_completion_length!r}")
    m = _mask_of(mask, log_prob)
    m = torch.ones_like(log_prob, dtype=torch.bool) if m is None else m
    mf = m.to(_acc_dtype(log_prob))
    adv = (advantages[:, None] if advantages.dim() == 1 else advantages).detach()
    log_ratio = _select(log_prob - old.detach(), m)
    if importance_sampling_level == "token":
        log_w = log_ratio
    else:
        log_w = (log_ratio.sum(-1) / mf.sum(-1).clamp_min(1.0)).unsqueeze(-1)
    coef_1 = torch.exp(log_w)
    if loss_type == "cispo":
        per_token = -torch.clamp(coef_1, max=eps_high).detach() * adv * log_prob
    elif loss_type == "sapo":
        t = torch.where(adv > 0, t_pos, t_neg)
        per_token = -(torch.sigmoid(t * (coef_1 - 1)) * 4 / t) * adv
    else:
        coef_2 = torch.clamp(coef_1, 1 - epsilon, 1 + eps_high)
        capped = coef_1 if delta is None else torch.clamp(coef_1, max=delta)
        per_token = -torch.minimum(capped * adv, coef_2 * adv)
    if beta != 0:
        d = _select(ref_log_prob.detach() - log_prob, m)
        per_token_kl = torch.exp(d) - d - 1
        per_token = per_token + beta * per_token_kl
    per_token = _select(per_token.expand_as(log_prob), m).to(mf.dtype)
    B = log_prob.shape[0]
    if loss_type in ("grpo", "sapo"):
        loss = (per_token.sum(-1) / mf.sum(-1).clamp_min(1.0)).mean()
    elif loss_type == "bnpo":
        loss = per_token.sum() / mf.sum().clamp_min(1.0)
    elif loss_type == "dr_grpo":
        loss = per_token.sum() / (B * max_completion_length)
    elif loss_type == "luspo":
        loss = per_token.sum(-1).mean()
    else:  # dapo, cispo
        n = mf.sum() if num_items_in_batch is None else torch.as_tensor(num_items_in_batch, dtype=mf.dtype,
                                                                           device=mf.device)
        loss = per_token.sum() / n.clamp_min(1.0)
    metrics: Dict[str, Tensor] = {}
    with torch.no_grad():
        def global_mean(x):  # TRL's global_masked_mean, one process
            if x.shape[1] == 1:
                return x.to(mf.dtype).sum() / max(B, 1)
            return _select(x.to(mf.dtype), m).sum() / mf.sum().clamp_min(1.0)

        def seq_means(x):  # TRL's masked_seq_mean: NaN for a sequence without tokens
            if x.shape[1] == 1:
                return x.squeeze(1).to(mf.dtype)
            return _select(x.to(mf.dtype), m).sum(-1) / mf.sum(-1)

        if beta != 0:
            metrics["kl"] = global_mean(per_token_kl)
        if loss_type == "cispo":
            metrics["cispo_clip_ratio"] = global_mean((coef_1 > eps_high) & (adv > 0))
        elif loss_type != "sapo":
            low = (coef_1 < 1 - epsilon) & (adv < 0)
            high = (coef_1 > 1 + eps_high) & (adv > 0)
            metrics["clip_ratio/low_mean"] = global_mean(low)
            metrics["clip_ratio/high_mean"] = global_mean(high)
            metrics["clip_ratio/region_mean"] = global_mean(low | high)
            lows, highs = seq_means(low), seq_means(high)
            metrics["clip_ratio/low_min"] = torch.where(lows.isnan(), torch.inf, lows).min()
            metrics["clip_ratio/high_max"] = torch.where(highs.isnan(), -torch.inf, highs).max()
        r = coef_1.expand_as(log_prob)
        metrics["ratio_mean"] = global_mean(coef_1)
        metrics["ratio_min"] = torch.where(m, r, torch.inf).min()
        metrics["ratio_max"] = torch.where(m, r, -torch.inf).max()
    return loss, metrics


def policy_gradient_loss(log_prob: Tensor, advantages: Tensor, *, mask: Optional[Tensor] = None,
                         aggregation: str = "token-mean", normalizer: Optional[float] = None,
                         process_group=None) -> Tensor:
    """REINFORCE surrogate -A lp (Williams 1992), aggregated; advantages are
    constants (RLOO, GRPO without ratio, REINFORCE++)."""
    if not isinstance(log_prob, Tensor) or not log_prob.dtype.is_floating_point:
        raise TypeError("log_prob must be a float tensor")
    _check_like(advantages, log_prob, "advantages")
    m = _mask_of(mask, log_prob)
    # select, don't multiply: a NaN advantage or log-prob on padding stays out
    return aggregate(-_select(advantages.detach(), m) * _select(log_prob, m), m, aggregation, normalizer,
                     process_group=process_group)


def kl_penalty(log_prob: Tensor, ref_log_prob: Tensor, estimator: str = "k3", *,
               clamp: Optional[float] = None) -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi, with
    delta = ref - lp (Schulman 2020, "Approximating KL Divergence"):

      - ``k1``: -delta (unbiased, high variance, can be negative)
      - ``k2``: delta^2 / 2 (biased, low variance)
      - ``k3``: exp(delta) - delta - 1 (unbiased, >= 0; GRPO's choice)

    Differentiable in ``log_prob``; ``ref_log_prob`` is a constant. Aggregate
    with :func:`aggregate` and add ``beta *`` it to the loss. ``clamp``: the
    estimate is clipped to [-clamp, clamp] (no gradient outside); verl's
    ``low_var_kl`` is k3 with ``clamp=10``, TRL's and Liger-Kernel's k3 are
    unclamped (the default).
    """
    if clamp is not None and (isinstance(clamp, bool) or not isinstance(clamp, numbers.Real) or not clamp > 0):
        raise ValueError(f"clamp must be a number > 0 or None, got {clamp!r}")
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"estimator must be one of {', '.join(KL_ESTIMATORS)}; got {estimator!r}")
    if not isinstance(log_prob, Tensor) or not log_prob.dtype.is_floating_point:
        raise TypeError("log_prob must be a float tensor")
    _check_like(ref_log_prob, log_prob, "ref_log_prob")
    delta = ref_log_prob.detach() - log_prob
    if estimator == "k1":
        kl = -delta
    elif estimator == "k2":
        kl = 0.5 * delta * delta
    else:
        kl = torch.expm1(delta) - delta
    return kl if clamp is None else torch.clamp(kl, -clamp, clamp)


def importance_weights(log_prob: Tensor, behaviour_log_prob: Tensor, *, level: str = "token",
                       mode: str = "truncate", cap: float = 2.0, mask: Optional[Tensor] = None) -> Tensor:
    """Truncated importance-sampling correction for a sampler whose
    log-probabilities differ from the trainer's (TIS, Yao et al. 2025;
    IMPALA's truncation, Espeholt et al. 2018). Detached weights of the shape
    of ``log_prob`` to multiply into the per-token loss:

      - ``level="token"``: w_t = exp(lp_t - b_t)
      - ``level="sequence"``: w_i = exp(sum_t m_it (lp_it - b_it)), the same
        for every token of row i
      - ``mode="truncate"``: min(w, cap); ``mode="mask"``: w where w <= cap,
        else 0 (the token or sequence is dropped).
    """
    if level not in ("token", "sequence"):
        raise ValueError(f"level must be 'token' or 'sequence', got {level!r}")
    if mode not in ("truncate", "mask"):
        raise ValueError(f"mode must be 'truncate' or 'mask', got {mode!r}")
    if isinstance(cap, bool) or not isinstance(cap, numbers.Real) or not cap > 0:
        raise ValueError(f"cap must be a number > 0, got {cap!r}")
    if not isinstance(log_prob, Tensor) or not log_prob.dtype.is_floating_point:
        raise TypeError("log_prob must be a float tensor")
    _check_like(behaviour_log_prob, log_prob, "behaviour_log_prob")
    m = _mask_of(mask, log_prob)
    with torch.no_grad():
        diff = _select(log_prob - behaviour_log_prob, m)
        if level == "sequence":
            d2 = _tokens_2d(diff)
            total = d2.to(_acc_dtype(d2)).sum(-1, keepdim=True).to(d2.dtype)
            diff = total.expand(d2.shape).reshape(log_prob.shape)
        w = torch.exp(diff)
        if mode == "truncate":
            return torch.clamp(w, max=cap)
        return torch.where(w <= cap, w, torch.zeros_like(w))


def entropy_bonus(entropy: Tensor, coef: float, *, mask: Optional[Tensor] = None,
                  aggregation: str = "token-mean", normalizer: Optional[float] = None,
                  process_group=None) -> Tensor:
    """-coef * aggregate(H): add to the loss to reward exploration (Williams
    and Peng 1991; PPO's c2 term)."""
    if isinstance(coef, bool) or not isinstance(coef, numbers.Real):
        raise TypeError(f"coef must be a number, got {type(coef).__name__}")
    return -coef * aggregate(entropy, mask, aggregation, normalizer, process_group=process_group)


def mismatch(sampler_log_prob: Tensor, trainer_log_prob: Tensor, mask: Optional[Tensor] = None, *,
             band: Tuple[float, float] = (0.9, 1.1)) -> Dict[str, Tensor]:
    """The figures to log to watch the mismatch between the sampler's and the
    trainer's log-probabilities of the same sampled tokens (training-inference
    mismatch): 0-d float64 tensors, over the tokens ``mask`` keeps, nothing
    differentiable and no host synchronisation.

    With ``d = trainer_log_prob - sampler_log_prob`` and the importance ratio
    ``r = exp(d)`` (trainer over sampler), before any truncation or clipping:

      - ``identical``: the fraction of tokens whose two log-probabilities are
        the same float (1.0 is the bit-for-bit agreement pgest's sampler and
        trainer give when both see the same logits or the same fused head);
      - ``max_abs_diff``, ``mean_abs_diff``: of ``d``;
      - ``kl_k1``: ``mean(-d)``, and ``kl_k3``: ``mean(exp(d) - d - 1)``, the
        estimates of KL(sampler || trainer) from the sampler's own draws
        (Schulman 2020; k3 is never negative);
      - ``ratio_mean``, ``ratio_std``, ``ratio_min``, ``ratio_max``;
      - ``outside_band``: the fraction of tokens whose ratio lies outside
        ``band`` (default [0.9, 1.1], the figure TRL's and verl's reports use);
      - ``tokens``: how many tokens counted.

    With no token kept every figure is 0 (``identical`` too).
    """
    if not isinstance(sampler_log_prob, Tensor) or not sampler_log_prob.dtype.is_floating_point:
        raise TypeError("sampler_log_prob must be a float tensor")
    _check_like(trainer_log_prob, sampler_log_prob, "trainer_log_prob")
    if (not isinstance(band, (tuple, list)) or len(band) != 2 or
            not all(isinstance(b, numbers.Real) and not isinstance(b, bool) for b in band) or
            not 0 <= band[0] <= band[1]):
        raise ValueError(f"band must be a pair (low, high) with 0 <= low <= high, got {band!r}")
    m = _mask_of(mask, sampler_log_prob)
    s = sampler_log_prob.detach().double()
    t = trainer_log_prob.detach().double()
    keep = torch.ones_like(s, dtype=torch.bool) if m is None else m
    d = torch.where(keep, t - s, torch.zeros((), dtype=torch.float64, device=s.device))
    r = torch.where(keep, torch.exp(d), torch.ones((), dtype=torch.float64, device=s.device))
    n = keep.sum().to(torch.float64)
    safe_n = n.clamp_min(1)
    mean = lambda v: torch.where(keep, v, 0.0).sum() / safe_n  # noqa: E731
    ratio_mean = mean(r)
    out = {
        "identical": torch.where(keep, (sampler_log_prob.detach() == trainer_log_prob.detach()).double(),
                                 0.0).sum() / safe_n,
        "max_abs_diff": d.abs().max() if d.numel() else torch.zeros((), dtype=torch.float64, device=s.device),
        "mean_abs_diff": mean(d.abs()),
        "kl_k1": mean(-d),
        "kl_k3": mean(torch.expm1(d) - d),
        "ratio_mean": ratio_mean,
        "ratio_std": mean((r - ratio_mean) ** 2).sqrt(),
        "ratio_min": torch.where(keep, r, torch.inf).amin() if r.numel() else r.new_ones((), dtype=torch.float64),
        "ratio_max": torch.where(keep, r, -torch.inf).amax() if r.numel() else r.new_ones((), dtype=torch.float64),
        "outside_band": mean(((r < band[0]) | (r > band[1])).double()),
        "tokens": n,
    }
    none = n == 0
    return {k: torch.where(none, torch.zeros((), dtype=torch.float64, device=v.device), v) for k, v in out.items()}
