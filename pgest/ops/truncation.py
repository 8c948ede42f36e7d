"""The truncation kernel's launch (csrc/include/pgest/truncation.h), its
registration as the torch op ``pgest::truncation`` with a fake kernel, and the
route for devices without a kernel; the public functions are in
pgest/truncation.py."""
import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _C, _checks, _native, _status, device_errors
from .._checks import check_rows


def _param(t: Tensor) -> Tuple[int, int]:
    """(address, element stride) of a per-row parameter: (R,) or one value."""
    return t.data_ptr(), (0 if t.numel() == 1 else t.stride(0))


def fill_params(pp, temperature: Tensor, top_k: Tensor, top_p: Tensor, min_p: Tensor, *,
                given_threshold: Optional[Tensor] = None, threshold: Optional[Tensor] = None,
                kept: Optional[Tensor] = None, kept_mass: Optional[Tensor] = None, cut: Optional[Tensor] = None,
                kept_logits: Optional[Tensor] = None) -> None:
    """Point a ``_C.TruncationParams`` at the per-row parameters ((R,) or one
    element, CPU: float64, int64 for top_k) and the outputs wanted."""
    pp.temperature, pp.temperature_stride = _param(temperature)
    pp.top_k, pp.top_k_stride = _param(top_k)
    pp.top_p, pp.top_p_stride = _param(top_p)
    pp.min_p, pp.min_p_stride = _param(min_p)
    for name, t in (("given_threshold", given_threshold), ("threshold", threshold), ("kept", kept),
                    ("kept_mass", kept_mass), ("cut", cut), ("kept_logits", kept_logits)):
        if t is not None:
            setattr(pp, name, t.data_ptr())


def raise_for(res, temperature: Tensor, K: int) -> None:
    """The exception for a kernel result of a truncated row pass."""
    if res[0] == _status.NONFINITE_INPUT and math.isfinite(res[4]):
        raise ValueError(f"logits[{res[1]}, {res[2]}] / temperature overflows ({res[4]} / "
                         f"{float(temperature[res[1] if temperature.numel() > 1 else 0])}): "
                         "the temperature is too small for these logits")
    if res[0]:
        _status.raise_for_status(res, input_name="logits", num_actions=K)


def empty_record(rows: int, dtype: torch.dtype, device: torch.device) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The (threshold, kept, kept_mass, cut) tensors a kernel fills, for rows
    of the accumulation type ``dtype``."""
    return (torch.empty(rows, dtype=dtype, device=device), torch.empty(rows, dtype=torch.int64, device=device),
            torch.empty(rows, dtype=torch.float64, device=device), torch.empty(rows, dtype=dtype, device=device))


def _args(x: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor, min_p: Tensor, **outputs):
    """A TruncationArgs for x's rows, pointed at the parameters and at the
    ``outputs`` (fill_params' keywords)."""
    a = _C.TruncationArgs()
    a.logits = x.data_ptr()
    a.dtype = _checks.DTYPE_CODES[x.dtype]
    a.rows, a.cols = x.shape
    a.row_stride, a.col_stride = x.stride()
    fill_params(a.params, temperature, top_k, top_p, min_p, **outputs)
    a.num_threads = _native.num_threads()
    return a


def truncation_native(x: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor, min_p: Tensor, *,
                      with_logits: bool = False, given_threshold: Optional[Tensor] = None, with_mass: bool = True):
    """(R, K) CPU logits and per-row parameters -> threshold (R,) in the
    accumulation type, kept (R,) int64, kept_mass (R,) float64, cut (R,) in
    the accumulation type (truncation.h) and, with
    ``with_logits``, the (R, K) tempered logits with -inf outside the kept set
    (else None). ``given_threshold``: replay it instead of selecting.
    ``with_mass=False``: kept_mass is None, and no pass over the kept set
    takes the statistics it needs."""
    R, K = x.shape
    threshold, kept, kept_mass, cut = empty_record(R, _checks.stats_dtype(x.dtype), x.device)
    kept_mass = kept_mass if with_mass else None
    z = torch.empty(R, K, dtype=threshold.dtype, device=x.device) if with_logits else None
    if R:
        a = _args(x, temperature, top_k, top_p, min_p, given_threshold=given_threshold, threshold=threshold,
                  kept=kept, kept_mass=kept_mass, cut=cut, kept_logits=z)
        raise_for(_C.truncation_cpu(a), temperature, K)
    return threshold, kept, kept_mass, cut, z


def truncation_radix(x: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor, min_p: Tensor):
    """threshold, kept, kept_mass, cut by the CUDA schedule's selection
    (radix descent, truncation.h): the CUDA kernel for CUDA logits, without
    a host synchronisation (a refused row's error word is deferred, its
    record NaN); for CPU logits the same row program with a team of one
    thread, which is how the tests check the GPU's algorithm."""
    # host parameters copied without waiting (a pageable source is staged before the call returns)
    params = tuple(t.to(x.device, non_blocking=True) for t in (temperature, top_k, top_p, min_p))
    rec = empty_record(x.shape[0], _checks.stats_dtype(x.dtype), x.device)
    if x.shape[0]:
        a = _args(x, *params, threshold=rec[0], kept=rec[1], kept_mass=rec[2], cut=rec[3])
        if x.is_cuda:
            res = _native.cuda_call("truncation", a, x.device, report=dict(input_name="logits", num_actions=x.shape[1]),
                                    values=x)
        else:
            res = _C.truncation_radix_cpu(a)
        if res[0]:
            raise_for(res, temperature, x.shape[1])
    return rec


def cuda_kernel_built() -> bool:
    """Whether this build has the CUDA truncation kernel."""
    return hasattr(_C, "truncation_cuda")


def mass_strictly_above(values: Tensor, masses: Tensor) -> Tensor:
    """Per entry of rows sorted in descending order, the mass of the entries
    strictly larger: the cumulative sum before the entry's tie group (ties
    are kept or left out together)."""
    R, L = values.shape
    before = torch.cumsum(masses, -1) - masses
    first = torch.ones_like(values, dtype=torch.bool)
    first[:, 1:] = values[:, 1:] != values[:, :-1]
    cols = torch.arange(L, device=values.device).expand(R, L)
    return before.gather(1, torch.cummax(torch.where(first, cols, torch.zeros_like(cols)), -1).values)


def midway_cut(threshold: Tensor, dropped: Tensor) -> Tensor:
    """The record's cut (truncation.h): midway between the smallest kept
    value and the largest left out, the smallest kept value where the two
    are neighbouring floats, -inf where nothing is left out."""
    mid = threshold / 2 + dropped / 2
    return torch.where(dropped == float("-inf"), dropped, torch.where(mid > dropped, mid, threshold))


def truncation_in_torch_ops(x: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor, min_p: Tensor):
    """The same definitions on devices without a truncation kernel (a build
    without CUDA kernels, other devices): a sort of each row, so O(K log K)
    and a (R, K) workspace. The kept set equals the kernel's except where a
    cumulative mass is within rounding of top_p (the sums run in another
    order)."""
    R, K = x.shape
    acc = _checks.stats_dtype(x.dtype)
    dev = x.device
    t = temperature.to(dev).expand(R)
    greedy = t == 0
    z = x.to(acc) / torch.where(greedy, torch.ones_like(t), t).to(acc)[:, None]
    if torch.isnan(z).any() or (z == float("inf")).any():
        row, col = (torch.isnan(z) | (z == float("inf"))).nonzero()[0].tolist()
        raise ValueError(f"logits[{row}, {col}] / temperature is {z[row, col].item()} (logits[{row}, {col}] = "
                         f"{x[row, col].item()}): scores must be finite or -inf")
    finite = z > float("-inf")
    if not finite.any(-1).all():
        row = int((~finite.any(-1)).nonzero()[0])
        raise ValueError(f"every entry of logits row {row} is -inf: nothing can be sampled")
    zs, _ = torch.sort(z, dim=-1, descending=True)
    zmax = zs[:, :1]
    live = finite.sum(-1)
    k = top_k.to(dev).expand(R)
    k_eff = torch.where((k > 0) & (k < live), k, live)
    t_k = zs.gather(1, (k_eff - 1)[:, None])
    in_k = zs >= t_k
    m = torch.where(in_k, torch.exp(zs.double() - zmax.double()), torch.zeros((), dtype=torch.float64, device=dev))
    strictly_above = mass_strictly_above(zs, m)
    p = top_p.to(dev).expand(R)
    target = p[:, None].double() * m.sum(-1, keepdim=True)
    in_p = (strictly_above < target) | (zs == zmax) | (p[:, None] >= 1)
    minp = min_p.to(dev).expand(R)
    t_m = torch.where(minp > 0, zmax.squeeze(1).double() + torch.log(minp.double().clamp_min(1e-300)),
                      torch.full_like(minp, float("-inf"), dtype=torch.float64)).to(acc)
    keep = in_k & in_p & (zs >= t_m[:, None]) & (zs > float("-inf"))
    kept = keep.sum(-1)
    threshold = torch.where(keep, zs, torch.full_like(zs, float("inf"))).min(-1).values
    total = torch.exp(zs.double() - zmax.double()).sum(-1)
    kept_mass = torch.where(keep, torch.exp(zs.double() - zmax.double()), 0.0).sum(-1) / total
    dropped = torch.where(~keep & (zs > float("-inf")), zs, torch.full_like(zs, float("-inf"))).amax(-1)
    cut = midway_cut(threshold, dropped)
    raw_max = x.to(acc).amax(-1)
    cut = torch.where(greedy, raw_max, cut)
    threshold = torch.where(greedy, raw_max, threshold)
    kept = torch.where(greedy, torch.ones_like(kept), kept)
    kept_mass = torch.where(greedy, torch.ones_like(kept_mass), kept_mass)
    return threshold, kept, kept_mass, cut


def check_values(temperature: Tensor, top_k: Tensor, top_p: Tensor, min_p: Tensor, rows: Optional[int]) -> None:
    """The parameters as the registered ops take them ((rows,) or (1,);
    float64, int64 for top_k) and their values, as pgest.truncation checks
    them (a negative temperature would reverse the row's order)."""
    for t, name, dtype in ((temperature, "temperature", torch.float64), (top_k, "top_k", torch.int64),
                           (top_p, "top_p", torch.float64), (min_p, "min_p", torch.float64)):
        _checks.check_tensor(t, name)
        if t.dtype != dtype or t.dim() != 1 or (rows is not None and t.numel() not in (1, rows)):
            raise ValueError(f"{name} must be a (rows,) or (1,) {dtype} tensor, got {tuple(t.shape)} {t.dtype}")
    for t, name, high in ((temperature, "temperature", math.inf), (top_p, "top_p", 1.0), (min_p, "min_p", 1.0)):
        ok = (t >= 0) & (t <= high) & torch.isfinite(t)
        if t.numel() and not bool(ok.all()):
            raise ValueError(f"{name} must be finite and in [0, {high}], got {t[~ok][:1].tolist()}")
    if top_k.numel() and bool((top_k < 0).any()):
        raise ValueError(f"top_k must be >= 0, got {int(top_k.min())}")


def check_actions_kept(z: Tensor, actions: Tensor, ignore_index: Optional[int], lead) -> Optional[Tensor]:
    """The first action outside its row's kept set (-inf in z, the (R, K)
    kept logits) raises ValueError, with the row in ``lead``'s shape where
    given. Where checks on z's device are deferred (CUDA): nothing is read
    back; the first such action's error word is deferred and the rows holding
    one are returned, (R,) bool, for the caller to poison."""
    R, K = z.shape
    a = actions.reshape(R, -1)
    S = a.shape[1]
    valid = a != ignore_index if ignore_index is not None else torch.ones_like(a, dtype=torch.bool)
    valid &= (a >= 0) & (a < K)  # out-of-range ids are the kernel's to report
    at = z.detach().gather(1, torch.where(valid, a, torch.zeros_like(a)))
    bad = valid & (at == float("-inf"))
    report = dict(input_name="logits", num_actions=K, samples_per_row=S, lead_shape=lead)
    if device_errors.defers(z):
        cols = torch.arange(S, device=z.device).expand(R, S)
        device_errors.defer_first([device_errors.first_error(bad, _status.ACTION_OUTSIDE_KEPT, cols)],
                                  "pgest log_prob", report)
        return bad.any(1)
    if bool(bad.any()):
        row, col = bad.nonzero()[0].tolist()
        _status.raise_for_status((_status.ACTION_OUTSIDE_KEPT, row, col, int(a[row, col]), None), **report)
    return None


# Checks of a traced truncated call whose data the graph holds: run where the
# graph runs, they raise the eager call's exceptions. Each returns ones (NaN
# on a row to poison) for the caller to multiply into a result (x * 1 is x's
# bits), so the check is part of the graph's data flow and never dropped.

@torch.library.custom_op("pgest::check_filters", mutates_args=())
def check_filters_op(temperature: Tensor, top_k: Tensor, top_p: Tensor, min_p: Tensor) -> Tensor:
    """pgest.truncation's parameter checks, where no pgest::truncation call
    makes them (a replayed threshold); a float64 one."""
    check_values(temperature, top_k, top_p, min_p, None)
    return torch.ones((), dtype=torch.float64, device=temperature.device)


@check_filters_op.register_fake
def _(temperature, top_k, top_p, min_p):
    return temperature.new_empty((), dtype=torch.float64)


def poison_scale(bad: Optional[Tensor], rows: int, like: Tensor) -> Tensor:
    """(rows,) of like's dtype: 1, NaN on the rows to poison."""
    one = torch.ones((rows,), dtype=like.dtype, device=like.device)
    return one if bad is None else one.masked_fill(bad, math.nan)


def check_kept_token_values(ids: Tensor, offsets: Tensor, K: Optional[int]) -> None:
    """An outside sampler's kept token lists (int64 ids, (rows + 1,) offsets):
    offsets rising from 0 to the number of ids, every row keeping one, ids in
    [0, K) (>= 0 where K is None)."""
    counts = offsets[1:] - offsets[:-1]
    if int(offsets[0]) != 0 or int(offsets[-1]) != ids.numel() or bool((counts < 0).any()):
        raise ValueError(f"kept_tokens row_offsets must rise from 0 to the number of token ids ({ids.numel()})")
    if ids.numel() and int(ids.min()) < 0:
        raise IndexError(f"kept_tokens token ids must be >= 0, got {int(ids.min())}")
    if counts.numel() and bool((counts == 0).any()):
        raise ValueError(f"kept_tokens keeps no token of row {int((counts == 0).nonzero()[0])}")
    if K is not None and ids.numel() and int(ids.max()) >= K:
        raise IndexError(f"kept_tokens token ids must be in [0, {K}), got {int(ids.max())}")


@torch.library.custom_op("pgest::check_kept_tokens", mutates_args=())
def check_kept_tokens_op(ids: Tensor, offsets: Tensor, cols: int) -> Tensor:
    """check_kept_token_values (cols < 0: no vocabulary bound); an int64 one."""
    for t, name in ((ids, "ids"), (offsets, "offsets")):
        _checks.check_tensor(t, name)
        if t.dtype != torch.int64 or t.dim() != 1:
            raise ValueError(f"{name} must be a 1-D int64 tensor, got {tuple(t.shape)} {t.dtype}")
    if offsets.numel() == 0:
        raise ValueError("offsets must have rows + 1 >= 1 entries")
    check_kept_token_values(ids, offsets, None if cols < 0 else cols)
    return torch.ones((), dtype=torch.int64, device=ids.device)


@check_kept_tokens_op.register_fake
def _(ids, offsets, cols):
    return ids.new_empty((), dtype=torch.int64)


@torch.library.custom_op("pgest::check_kept", mutates_args=())
def check_kept_op(logits: Tensor, actions: Tensor, ignore_index: Optional[int]) -> Tensor:
    """(R, K) kept logits (tempered, -inf outside the kept set) and (R, S)
    actions: ValueError where an action is outside its row's kept set (on
    CUDA deferred, the row poisoned); (R,) of the logits' dtype, 1 or NaN on
    a poisoned row."""
    check_rows(logits, actions)
    return poison_scale(check_actions_kept(logits, actions, ignore_index, None), logits.shape[0], logits)


@check_kept_op.register_fake
def _(logits, actions, ignore_index):
    return logits.new_empty((logits.shape[0],))


@torch.library.custom_op("pgest::truncation", mutates_args=())
def truncation_op(logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor,
                  min_p: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(R, K) logits, per-row (R,) or one-element parameters (temperature,
    top_p, min_p float64; top_k int64) -> threshold, kept, kept_mass, cut."""
    check_rows(logits, None)
    check_values(temperature, top_k, top_p, min_p, logits.shape[0])
    if logits.device.type == "cpu":
        return truncation_native(logits, *(t.cpu() for t in (temperature, top_k, top_p, min_p)))[:4]
    if logits.is_cuda and cuda_kernel_built():
        return truncation_radix(logits, temperature, top_k, top_p, min_p)
    return truncation_in_torch_ops(logits, temperature, top_k, top_p, min_p)


@truncation_op.register_fake
def _(logits, temperature, top_k, top_p, min_p):
    R = logits.shape[0]
    acc = _checks.stats_dtype(logits.dtype)
    return (logits.new_empty((R,), dtype=acc), logits.new_empty((R,), dtype=torch.int64),
            logits.new_empty((R,), dtype=torch.float64), logits.new_empty((R,), dtype=acc))


def truncation_rows(x: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor, min_p: Tensor):
    """threshold, kept, kept_mass, cut by the cheapest route: a direct call on the
    CPU in eager mode, the registered op otherwise."""
    if x.device.type == "cpu" and not _native.traced():
        return truncation_native(x, temperature, top_k, top_p, min_p)[:4]
    return truncation_op(x, temperature, top_k, top_p, min_p)
