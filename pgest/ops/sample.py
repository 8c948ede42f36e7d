"""The sample kernels' launch, their registration as torch ops (fake
kernels, autograd, vmap) and the eager fast path; the public functions are
in pgest/sample.py."""
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _C, _checks, _native, _status
from .._checks import check_generator, check_num_samples, check_rows, check_seed
from .._vmap import register_refusal
from ..philox import cpu_seed, seed_tensor
from .log_prob import traced
from .truncation import fill_params, raise_for


def sample_native(x: Tensor, num_samples: int, seed: int, offset: int = 0, seed_t: Optional[Tensor] = None,
                  shapes=None, uniforms: Optional[Tensor] = None, truncation=None):
    """(R, K) logits -> actions (R, S), log_prob (R, S), entropy (R,), stats
    (2, R) = [row max, log Z] (what a later log_prob backward needs).
    ``shapes``: (actions shape, entropy shape) to allocate in instead.
    ``uniforms``: (R, S) float64 in [0, 1), contiguous, on x's device, drawn
    from instead of Philox (the fused linear head places draws in a tile).
    ``truncation`` (CPU): (temperature, top_k, top_p, min_p, record) with the
    per-row parameters of ops/truncation.fill_params and the record's
    (threshold, kept, kept_mass, cut) tensors to fill: draw from each row's kept set."""
    R, K = x.shape
    acc = _checks.stats_dtype(x.dtype)
    dev = _native.device_of(x)
    a_shape, e_shape = ((R, num_samples), (R,)) if shapes is None else shapes
    actions = _native.empty(a_shape, torch.int64, dev)
    log_prob = _native.empty(a_shape, acc, dev)
    entropy = _native.empty(e_shape, acc, dev)
    stats = torch.empty(2, R, dtype=acc, device=dev)
    if R:
        a = _C.SampleArgs()
        a.logits = x.data_ptr()
        a.dtype = _checks.DTYPE_CODES[x.dtype]
        a.rows, a.cols = R, K
        a.row_stride, a.col_stride = x.stride()
        a.num_samples = num_samples
        a.seed, a.offset = seed & 0xFFFFFFFFFFFFFFFF, offset
        if uniforms is not None:
            a.uniforms = uniforms.data_ptr()
        a.actions, a.log_prob, a.entropy = actions.data_ptr(), log_prob.data_ptr(), entropy.data_ptr()
        a.row_max = stats.data_ptr()
        a.log_z = a.row_max + R * stats.element_size()
        a.num_threads = torch.get_num_threads()
        if truncation is not None:
            *params, (threshold, kept, kept_mass, cut) = truncation
            fill_params(a.truncation, *params, threshold=threshold, kept=kept, kept_mass=kept_mass, cut=cut)
        if x.is_cuda:
            res = _native.cuda_call("sample", a, dev, report=dict(input_name="logits", num_actions=K), seed=seed_t,
                                values=x)
        else:
            res = _C.sample_cpu(a)
        if truncation is not None:
            raise_for(res, truncation[0], K)
        if res[0]:
            _status.raise_for_status(res, input_name="logits", num_actions=K)
    return actions, log_prob, entropy, stats


@torch.library.custom_op("pgest::sample", mutates_args=())
def sample_op(logits: Tensor, num_samples: int, seed: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(R, K) logits -> actions (R, S), log_prob (R, S), entropy (R,), stats (2, R).
    ``seed`` is the (2,) int64 (seed, offset) of :func:`pgest.philox.seed_tensor`."""
    check_rows(logits, None)
    check_num_samples(num_samples)
    check_seed(seed, logits.device)
    if logits.device.type == "cpu":
        return sample_native(logits, num_samples, int(seed[0]), int(seed[1]))
    return sample_native(logits, num_samples, 0, 0, seed_t=seed)


register_refusal(sample_op, "pgest.sample")


@sample_op.register_fake
def _(logits, num_samples, seed):
    R = logits.shape[0]
    acc = _checks.stats_dtype(logits.dtype)
    return (logits.new_empty((R, num_samples), dtype=torch.int64), logits.new_empty((R, num_samples), dtype=acc),
            logits.new_empty((R,), dtype=acc), logits.new_empty((2, R), dtype=acc))


def draw_rows(x: Tensor, num_samples: int, generator: Optional[torch.Generator], shapes=None):
    """Sample (R, K) rows by the cheapest route: the registered op under
    torch.compile or on CUDA (the seed stays on the device), else a direct call
    with the same seed drawn from the generator. With ``shapes`` (see
    sample_native) the outputs come in those shapes on every route."""
    if not x.is_cuda and not traced():
        if generator is not None:
            check_generator(generator, x.device)
        return sample_native(x, num_samples, cpu_seed(generator), shapes=shapes)
    out = sample_op(x, num_samples, seed_tensor(generator, x.device))
    if shapes is None:
        return out
    return out[0].view(shapes[0]), out[1].view(shapes[0]), out[2].view(shapes[1]), out[3]
