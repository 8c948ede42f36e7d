"""Rollout corrections under the names TRL's and verl's trainers use: the
importance weights and rejection masks that correct a policy-gradient loss for
a sampler whose log-probabilities differ from the trainer's (another engine,
another precision, an older policy), and the figures those trainers log.

- :func:`trl_importance_sampling`: TRL's ``vllm_importance_sampling_*``
  correction (``GRPOTrainer``, TRL 1.16): per-token or per-sequence ratios
  ``exp(old - sampling)``, truncated (TIS, Yao et al. 2025, "Your efficient RL
  framework secretly brings you off-policy RL training") or masked outside
  ``[clip_min, clip_max]`` (MIS), with TRL's ``sampling/...`` metrics.
- :func:`verl_rollout_correction`: verl's ``algorithm.rollout_correction``
  (verl 0.9.1's ``compute_rollout_correction_and_rejection_mask``):
  token- or sequence-level importance weights, truncated (TIS) or zeroed
  outside ``lower_upper`` (IcePop, Ling Team 2025), optionally normalised to
  mean 1; rejection sampling by per-token or per-sequence divergences (k1,
  k2, k3 of Schulman 2020; ``seq_mean_k1`` is the geometric-mean ratio
  filter of Liu et al. 2025, "When Speed Kills Stability"); and the
  ``rollout_corr/...`` metrics (weights, rejections, KL, perplexities, chi^2).

Both are plain tensor functions of per-token log-probabilities, with no
gradient (the weights multiply a loss; the masks select its tokens): pgest's
sampler and trainer agree bit for bit when they see the same logits, so these
matter when the sampler is another engine. :func:`pgest.objectives.mismatch`
gives pgest's own figures for the same gap.
"""
from __future__ import annotations

import math
import numbers
from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor

TRL_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
VERL_RS_OPTIONS = ("token_k1", "token_k2", "token_k3", "seq_sum_k1", "seq_sum_k2", "seq_sum_k3", "seq_mean_k1",
                   "seq_mean_k2", "seq_mean_k3", "seq_max_k2", "seq_max_k3")
BOUND = 20.0  # |log ratio| is clamped to it before an exponential, as verl does


def _check(trainer: Tensor, sampler: Tensor, mask: Tensor, names: Tuple[str, str, str]) -> None:
    for t, name in zip((trainer, sampler, mask), names):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    for t, name in zip((trainer, sampler), names):
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name} must be a float tensor, got {t.dtype}")
    if trainer.dim() != 2:
        raise ValueError(f"{names[0]} must be (sequences, tokens), got shape {tuple(trainer.shape)}")
    for t, name in ((sampler, names[1]), (mask, names[2])):
        if t.shape != trainer.shape:
            raise ValueError(f"{name} must have the shape of {names[0]} {tuple(trainer.shape)}, got {tuple(t.shape)}")
        if t.device != trainer.device:
            raise ValueError(f"{name} is on {t.device} but {names[0]} is on {trainer.device}")


# ---- TRL -----------------------------------------------------------------------

def trl_importance_sampling(old_log_prob: Tensor, sampling_log_prob: Tensor, mask: Tensor, *,
                            mode: str = "sequence_mask", clip_max: Optional[float] = 3.0,
                            clip_min: Optional[float] = None) -> Tuple[Tensor, Dict[str, float]]:
    """TRL's importance-sampling correction of a sampler's log-probabilities.

    Args:
        old_log_prob: (B, T) the trainer's log-probabilities of the sampled
            tokens before the update (TRL's ``old_per_token_logps``).
        sampling_log_prob: (B, T) the sampler's (``sampling_per_token_logps``);
            NaN where the sampler could not score a token (ratio 1 there).
        mask: (B, T) 1 for a completion token that counts.
        mode: ``vllm_importance_sampling_mode``: ``token_truncate``,
            ``token_mask``, ``sequence_truncate`` or ``sequence_mask``.
        clip_max, clip_min: ``vllm_importance_sampling_clip_max`` / ``_min``:
            the truncation bounds, or the band outside which a ratio is 0.

    Returns:
        ``(ratio, metrics)``: the ratio to multiply into the per-token loss,
        (B, T) for token modes and (B, 1) for sequence modes (TRL's
        ``importance_sampling_ratio``), and the figures TRL logs:
        ``sampling/sampling_logp_difference/mean`` and ``/max`` (of
        ``|old - sampling|`` over the counted, scored tokens) and
        ``sampling/importance_sampling_ratio/min``, ``/mean``, ``/max``.
    """
    _check(old_log_prob, sampling_log_prob, mask, ("old_log_prob", "sampling_log_prob", "mask"))
    if mode not in TRL_MODES:
        raise ValueError(f"mode must be one of {TRL_MODES}, got {mode!r}")
    for v, name in ((clip_max, "clip_max"), (clip_min, "clip_min")):
        if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Real) or math.isnan(v)):
            raise ValueError(f"{name} must be a number or None, got {v!r}")
    with torch.no_grad():
        m = mask.to(old_log_prob.dtype)
        diff = torch.nan_to_num((old_log_prob - sampling_log_prob) * m, nan=0.0)
        sequence = mode.startswith("sequence")
        ratio = torch.exp(diff.sum(-1, keepdim=True) if sequence else diff)
        if mode.endswith("truncate"):
            if clip_min is not None or clip_max is not None:
                ratio = torch.clamp(ratio, min=clip_min, max=clip_max)
        else:
            low = -math.inf if clip_min is None else clip_min
            high = math.inf if clip_max is None else clip_max
            ratio = ratio.masked_fill((ratio < low) | (ratio > high), 0.0)
        counted = mask.bool()
        delta = (old_log_prob - sampling_log_prob).abs()
        delta = delta[counted & ~torch.isnan(delta)]
        flat = ratio.flatten() if sequence else ratio[counted]
        stat = lambda v, f: f(v).item() if v.numel() else 0.0  # noqa: E731
        metrics = {
            "sampling/sampling_logp_difference/mean": stat(delta, torch.mean),
            "sampling/sampling_logp_difference/max": stat(delta, torch.max),
            "sampling/importance_sampling_ratio/min": stat(flat, torch.min),
            "sampling/importance_sampling_ratio/mean": stat(flat, torch.mean),
            "sampling/importance_sampling_ratio/max": stat(flat, torch.max),
        }
    return ratio, metrics


# ---- verl ----------------------------------------------------------------------

def _msum(v: Tensor, m: Tensor, axis=None) -> Tensor:
    """Sum over the mask; entries outside it (NaN included) do not count."""
    s = torch.where(m.bool(), v, torch.zeros((), dtype=v.dtype, device=v.device)) * m
    return s.sum() if axis is None else s.sum(axis)


def _mmean(v: Tensor, m: Tensor, axis=None) -> Tensor:
    """verl's masked mean: the sum over the mask / (its count + 1e-8)."""
    return _msum(v, m, axis) / ((m.sum() if axis is None else m.sum(axis)) + 1e-8)


def _seq_summary(prefix: str, seq: Tensor, high: float, low: Optional[float], center: float) -> Dict[str, float]:
    """Statistics of one value per sequence (the sequences with tokens)."""
    if not seq.numel():
        out = {f"{prefix}_seq_{k}": 0.0 for k in ("mean", "std", "max", "min", "max_deviation", "fraction_high")}
        out[f"{prefix}_seq_fraction_low"] = 0.0
        return out
    out = {f"{prefix}_seq_mean": seq.mean().item(), f"{prefix}_seq_std": seq.std().item() if seq.numel() > 1 else 0.0,
           f"{prefix}_seq_max": seq.max().item(), f"{prefix}_seq_min": seq.min().item(),
           f"{prefix}_seq_max_deviation": (seq - center).abs().max().item(),
           f"{prefix}_seq_fraction_high": (seq > high).float().mean().item()}
    if low is not None:
        out[f"{prefix}_seq_fraction_low"] = (seq < low).float().mean().item()
    return out


def _clamped_std(v: Tensor, m: Tensor, low: float, high: float) -> float:
    if m.sum() <= 1:
        return 0.0
    c = v.clamp(min=low, max=high)
    return torch.sqrt(torch.clamp(_mmean(c.square(), m) - _mmean(c, m).square(), min=0.0)).item()


def _is_threshold(spec) -> Tuple[float, Optional[float]]:
    """(upper, lower) of rollout_is_threshold: a number (TIS) or "lower_upper" (IcePop)."""
    if isinstance(spec, bool) or not isinstance(spec, (numbers.Real, str)):
        raise TypeError(f"rollout_is_threshold must be a number or a 'lower_upper' string, got {spec!r}")
    lower = None
    try:
        if isinstance(spec, str) and "_" in spec:
            lower, upper = (float(p) for p in spec.strip().split("_", 1))
        else:
            upper = float(spec)
    except ValueError:
        raise ValueError(f"rollout_is_threshold {spec!r} is not a number or 'lower_upper'") from None
    if not upper > 0 or (lower is not None and not 0 < lower <= upper):
        raise ValueError(f"rollout_is_threshold needs 0 < lower <= upper, got {spec!r}")
    return upper, lower


def _rs_thresholds(options: List[str], spec) -> Dict[str, Tuple[Optional[float], float]]:
    """(lower, upper) per rejection option: k1 options take "lower_upper" or
    an upper bound u (lower 1/u) on the ratio; k2/k3 an upper bound."""
    if spec is None:
        raise ValueError("rollout_rs_threshold must be given with rollout_rs")
    if isinstance(spec, bool) or not isinstance(spec, (numbers.Real, str)):
        raise TypeError(f"rollout_rs_threshold must be a number or a string, got {spec!r}")
    parts = [str(spec)] if not isinstance(spec, str) else [p.strip() for p in spec.split(",") if p.strip()]
    if len(parts) not in (1, len(options)):
        raise ValueError(f"rollout_rs_threshold needs one threshold or one per option ({len(options)}), got {spec!r}")
    parts = parts * len(options) if len(parts) == 1 else parts
    out = {}
    for opt, p in zip(options, parts):
        try:
            if opt.endswith("k1"):
                lower, upper = (float(x) for x in p.split("_", 1)) if "_" in p else (1.0 / float(p), float(p))
            elif "_" in p:
                raise ValueError(f"rollout_rs_threshold for {opt} is one upper bound, got {p!r}")
            else:
                lower, upper = None, float(p)
        except (ValueError, ZeroDivisionError) as e:
            raise ValueError(f"rollout_rs_threshold {p!r} for {opt}: {e}") from None
        if not upper > 0 or (lower is not None and not 0 < lower <= upper):
            raise ValueError(f"rollout_rs_threshold for {opt} needs 0 < lower <= upper, got {p!r}")
        out[opt] = (lower, upper)
    return out


def _is_weights(log_ratio: Tensor, m: Tensor, level: str, threshold, normalize: bool):
    upper, lower = _is_threshold(threshold)
    if level == "token":
        for_metrics = log_ratio
        raw = torch.exp(log_ratio.clamp(-BOUND, BOUND))
    else:
        for_metrics = _msum(log_ratio, m, -1)[:, None]
        raw = torch.exp(for_metrics.clamp(-BOUND, BOUND)).expand_as(log_ratio)
    raw = raw * m
    if lower is None:
        w = raw.clamp(max=upper)
    else:
        w = torch.where((raw >= lower) & (raw <= upper), raw, torch.zeros_like(raw))
    low = 1.0 / upper if lower is None else lower
    mb = m.bool()
    mt = {"rollout_is_mean": _mmean(w, m).item()}
    if level == "sequence":
        mt["rollout_is_max"] = torch.exp(for_metrics.max().clamp(max=BOUND)).item()
        mt["rollout_is_min"] = torch.exp(for_metrics.min()).item()
        # the log bounds in float32, as verl takes them
        log_upper, log_low = (torch.tensor(v, device=for_metrics.device).log() for v in (upper, low))
        mt["rollout_is_ratio_fraction_high"] = (for_metrics > log_upper).float().mean().item()
        mt["rollout_is_ratio_fraction_low"] = (for_metrics < log_low).float().mean().item()
    else:
        mt["rollout_is_ratio_fraction_high"] = _mmean((raw > upper).float(), m).item()
        mt["rollout_is_ratio_fraction_low"] = _mmean((raw < low).float(), m).item()
        mt["rollout_is_max"] = w.masked_fill(~mb, -math.inf).max().item()
        mt["rollout_is_min"] = w.masked_fill(~mb, math.inf).min().item()
    mt["rollout_is_std"] = _clamped_std(w, m, 0.0, upper)
    wc = w.clamp(min=0.0, max=upper)
    mt["rollout_is_eff_sample_size"] = 1.0 / _mmean((wc / (_mmean(wc, m) + 1e-8)).square(), m).item()
    per_seq = _mmean(w, m, -1)
    seq = _seq_summary("rollout_is", per_seq, upper, low, 1.0)
    raw_seq = _mmean(raw, m, -1)  # the pre-truncation means: a truncated one never exceeds the bound
    seq["rollout_is_seq_fraction_high"] = (raw_seq > upper).float().mean().item()
    seq["rollout_is_seq_fraction_low"] = (raw_seq < low).float().mean().item()
    mt.update(seq)
    if lower is not None:
        mt["rollout_is_oob_ratio"] = _mmean(((raw < lower) | (raw > upper)).float(), m).item()
    if normalize:
        if level == "token":
            mean = _mmean(w, m)
        else:
            has = (m.sum(-1) > 0).to(w.dtype)
            mean = (per_seq * has).sum() / has.sum().clamp_min(1e-8)
        if mean > 1e-8:
            w = w / mean
            mt["rollout_is_batch_norm_factor"] = mean.item()
        else:
            mt["rollout_is_batch_norm_factor"] = 1.0
    return w, mt


def _rejection(log_ratio: Tensor, m: Tensor, rollout_rs: str, threshold):
    if not isinstance(rollout_rs, str) or not rollout_rs.strip():
        raise ValueError("rollout_rs must be a non-empty string of comma-separated options")
    options = list(dict.fromkeys(o.strip() for o in rollout_rs.split(",") if o.strip()))
    bad = [o for o in options if o not in VERL_RS_OPTIONS]
    if bad:
        raise ValueError(f"rollout_rs options {bad} are not among {VERL_RS_OPTIONS}")
    bounds = _rs_thresholds(options, threshold)
    lr = log_ratio.clamp(-BOUND, BOUND)
    k = {"k1": -lr, "k2": 0.5 * lr ** 2, "k3": torch.exp(lr) - 1.0 - lr}
    mb = m.bool()
    valid = m.sum(-1) > 0
    combined = torch.ones_like(m, dtype=log_ratio.dtype)
    metrics: Dict[str, float] = {}
    for opt in options:
        lower, upper = bounds[opt]
        div = opt[-2:]
        k1 = div == "k1"
        hi, lo = (math.log(upper), math.log(lower)) if k1 else (upper, 0.0)
        if opt.startswith("token"):
            stat, seq = k[div], None
            keep = (stat >= lo) & (stat <= hi) if k1 else stat <= hi
        else:
            if opt.startswith("seq_sum"):
                seq = _msum(k[div], m, -1)
            elif opt.startswith("seq_mean"):
                seq = _mmean(k[div], m, -1)
            else:
                top = k[div].masked_fill(~mb, -math.inf).max(-1).values
                seq = torch.where(top == -math.inf, torch.zeros_like(top), top)
            keep_seq = (seq >= lo) & (seq <= hi) if k1 else seq <= hi
            keep = keep_seq[:, None].expand_as(mb)
            stat = seq[:, None].expand_as(m)
        p = f"rollout_rs_{opt}"
        seq_v = (seq if seq is not None else _mmean(stat, m, -1))[valid]
        by_seq = seq is not None and seq_v.numel() > 0
        metrics[f"{p}_mean"] = _mmean(stat, m).item()
        if by_seq:
            metrics[f"{p}_max"], metrics[f"{p}_min"] = seq_v.max().item(), seq_v.min().item()
            metrics[f"{p}_fraction_high"] = (seq_v > hi).float().mean().item()
            metrics[f"{p}_fraction_low"] = (seq_v < lo).float().mean().item() if k1 else 0.0
        else:
            metrics[f"{p}_max"] = stat.masked_fill(~mb, -math.inf).max().item()
            metrics[f"{p}_min"] = stat.masked_fill(~mb, math.inf).min().item()
            metrics[f"{p}_fraction_high"] = _mmean((stat > hi).float(), m).item()
            metrics[f"{p}_fraction_low"] = _mmean((stat < lo).float(), m).item() if k1 else 0.0
        metrics[f"{p}_std"] = _clamped_std(stat, m, lo, hi)
        metrics.update(_seq_summary(p, seq_v, hi, lo if k1 else None, 0.0))
        kf = keep.to(log_ratio.dtype)
        combined = combined * kf
        metrics[f"{p}_masked_fraction"] = _mmean(1 - kf, m).item()
        seq_kept = (~(~keep & mb)).all(-1).to(log_ratio.dtype)
        metrics[f"{p}_seq_masked_fraction"] = (((1.0 - seq_kept) * valid.float()).sum() / valid.float().sum()
                                               ).item() if valid.any() else 0.0
    metrics["rollout_rs_masked_fraction"] = _mmean(1 - combined, m).item()
    metrics["rollout_rs_seq_masked_fraction"] = ((~((combined > 0.5) & mb) & mb).any(-1)).float().mean().item()
    return combined, metrics


def _off_policy(old: Tensor, rollout: Tensor, m: Tensor) -> Dict[str, float]:
    """verl's mismatch figures: perplexities, KL (k1, k3) and chi^2 between
    the rollout and the training policy."""
    train_lp, roll_lp = _mmean(old, m, -1), _mmean(rollout, m, -1)
    log_ratio = old - rollout
    diff = roll_lp - train_lp
    rho = torch.exp(log_ratio.clamp(-BOUND, BOUND))
    return {
        "training_ppl": torch.exp(-train_lp).mean().item(), "training_log_ppl": (-train_lp).mean().item(),
        "kl": _mmean(rollout - old, m).item(), "k3_kl": _mmean(torch.exp(log_ratio) - log_ratio - 1, m).item(),
        "rollout_ppl": torch.exp(-roll_lp).mean().item(), "rollout_log_ppl": (-roll_lp).mean().item(),
        "log_ppl_diff": diff.mean().item(), "log_ppl_abs_diff": diff.abs().mean().item(),
        "log_ppl_diff_max": diff.max().item(), "log_ppl_diff_min": diff.min().item(),
        "ppl_ratio": torch.exp(diff).mean().item(),
        "chi2_token": (_mmean(rho.square(), m) - 1.0).item(),
        "chi2_seq": (torch.exp(2.0 * _msum(log_ratio, m, -1).clamp(-BOUND, BOUND)).mean() - 1.0).item(),
    }


def verl_rollout_correction(old_log_prob: Tensor, rollout_log_prob: Tensor, response_mask: Tensor, *,
                            rollout_is: Optional[str] = None, rollout_is_threshold: Union[float, str, None] = 2.0,
                            rollout_is_batch_normalize: bool = False, rollout_rs: Optional[str] = None,
                            rollout_rs_threshold: Union[float, str, None] = None
                            ) -> Tuple[Optional[Tensor], Tensor, Dict[str, float]]:
    """verl's rollout correction: importance weights, rejection mask and the
    ``rollout_corr/...`` metrics, with verl's arguments and definitions.

    Args:
        old_log_prob: (B, T) the training policy's log-probabilities of the
            sampled tokens.
        rollout_log_prob: (B, T) the rollout engine's.
        response_mask: (B, T) 1 for a response token (at least one).
        rollout_is: ``"token"`` (w_t = exp(old_t - rollout_t)),
            ``"sequence"`` (w = exp(sum_t of them), every token of the
            sequence), or None for no weights.
        rollout_is_threshold: a number u (TIS: min(w, u)) or ``"l_u"``
            (IcePop: w where l <= w <= u, else 0).
        rollout_is_batch_normalize: divide the weights by their mean over
            the batch (tokens, or sequences for ``"sequence"``).
        rollout_rs: rejection options, comma separated (every one must pass):
            ``token_k1/k2/k3``, ``seq_sum_k1/k2/k3``, ``seq_mean_k1/k2/k3``,
            ``seq_max_k2/k3``; k1 = -log ratio (bounds on the ratio, as
            ``"l_u"`` or u for [1/u, u]), k2 = (log ratio)^2 / 2, k3 =
            ratio - 1 - log ratio (an upper bound). ``seq_mean_k1`` keeps a
            sequence whose geometric-mean ratio lies in [l, u].
        rollout_rs_threshold: one threshold, or one per option, comma separated.

    Returns:
        ``(weights, response_mask, metrics)``: the (B, T) weights (None
        without ``rollout_is``; 0 on padding), the response mask with the
        rejected tokens set to 0 (the input's dtype), and the metrics verl
        logs, under ``rollout_corr/``: ``rollout_is_*`` (mean, max, min,
        std, effective sample size, fractions above and below the bounds,
        per-sequence statistics, the batch normalisation factor), for each
        rejection option ``rollout_rs_<option>_*`` and the overall
        ``rollout_rs_masked_fraction`` / ``rollout_rs_seq_masked_fraction``,
        and ``kl``, ``k3_kl``, ``training_ppl``, ``rollout_ppl``,
        ``log_ppl_diff``, ``ppl_ratio``, ``chi2_token``, ``chi2_seq`` and the
        like. Single-process figures: verl takes the batch normalisation's
        mean over its data-parallel group.
    """
    _check(old_log_prob, rollout_log_prob, response_mask, ("old_log_prob", "rollout_log_prob", "response_mask"))
    if rollout_is not in (None, "token", "sequence"):
        raise ValueError(f"rollout_is must be 'token', 'sequence' or None, got {rollout_is!r}")
    if not bool(response_mask.bool().any()):
        raise ValueError("response_mask must keep at least one token")
    with torch.no_grad():
        # the mask in its own dtype, as verl divides by its counts: an integer
        # mask's count + 1e-8 is a float32 (the figures then agree to 1e-12)
        m = response_mask
        log_ratio = old_log_prob - rollout_log_prob
        metrics: Dict[str, float] = {}
        weights = None
        if rollout_is is not None and rollout_is_threshold is not None:
            weights, mt = _is_weights(log_ratio, m, rollout_is, rollout_is_threshold, rollout_is_batch_normalize)
            metrics.update(mt)
        new_mask = response_mask.clone()
        if rollout_rs is not None:
            keep, mt = _rejection(log_ratio, m, rollout_rs, rollout_rs_threshold)
            new_mask = (m * keep).to(response_mask.dtype)
            metrics.update(mt)
        metrics.update(_off_policy(old_log_prob, rollout_log_prob, m))
    return weights, new_mask, {f"rollout_corr/{k}": v for k, v in metrics.items()}
