"""The reinforce_grad kernels' launch, their registration as torch ops (fake
kernels, autograd, vmap) and the eager fast path; the public functions are
in pgest/reinforce_grad.py."""
import warnings
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _C, _checks, _native, _status
from .._checks import check_num_samples, check_seed
from .._rewards import check_reward_args
from .._vmap import register_refusal

# How far log sum exp of a row may be from 0 before the input is taken for
# unnormalised logits: far above the rounding of a log_softmax output in the
# dtype (|log p| <= ~20 at 2^-8 relative for bfloat16), far below log 2.
_NORMALISED_TOL = {torch.float32: 1e-3, torch.float64: 1e-3, torch.float16: 0.1, torch.bfloat16: 0.1}


_warned_unnormalised = False


# Set to 1 by the kernel when a row is not normalised. Never reset: it only
# has to make the first warning happen, and the kernel only ever writes 1,
# so one buffer serves every call (no allocation on the hot path).
_UNNORMALISED = torch.zeros((1,), dtype=torch.int32, device="cpu")


def check_call(log_probs, labels, reward_table, kind: int, constant: float, baseline, num_samples):
    """Everything the kernel needs for memory safety and meaningful numbers,
    checked once on every route (the registered op is public). Returns the
    labels as int64 and the detached table and baseline."""
    _checks.check_float_tensor(log_probs, "log_probs")
    if log_probs.dim() != 2:
        raise ValueError(f"log_probs must be 2-D (B, K), got shape {tuple(log_probs.shape)}")
    rows, cols = log_probs.shape
    device = log_probs.device
    _checks.check_device_supported(log_probs, "log_probs")
    check_num_samples(num_samples)
    if rows > 0 and cols == 0:
        raise ValueError("log_probs has K = 0 actions: there is nothing to sample")
    return check_reward_args(labels, reward_table, kind, constant, baseline, rows, cols, num_samples, device)


def warn_unnormalised() -> None:
    global _warned_unnormalised
    if _warned_unnormalised:
        return
    _warned_unnormalised = True
    warnings.warn(
        "pgest.reinforce_grad: log_probs are not normalised (log sum exp of a row is not 0). The gradient it "
        "returns is with respect to log-probabilities; backpropagating it into logits trains a wrong gradient. "
        "Pass torch.log_softmax(logits, -1), or use pgest.reinforce on the logits. (Warned once.)",
        UserWarning, stacklevel=4)


def _report(cols: int, reward_table) -> dict:
    """What the kernel's error messages need to know of a call."""
    return dict(input_name="log_probs", num_actions=cols,
                table_is_vector=reward_table is not None and reward_table.dim() == 1)


def run_kernel(x, labels, reward_table, kind, constant, baseline_t, num_samples, seed: int, seed_t=None):
    """The kernel on checked arguments: (actions (B, S), rewards (B, S), grad (B, K))."""
    rows, cols = x.shape
    device = x.device
    actions = torch.empty((rows, num_samples), dtype=torch.int64, device=device)
    rewards = torch.empty((rows, num_samples), dtype=torch.float32, device=device)
    grad = torch.empty((rows, cols), dtype=x.dtype, device=device)
    if rows == 0:
        return actions, rewards, grad
    a = _C.ReinforceGradArgs()
    a.log_probs = x.data_ptr()
    a.dtype = _checks.DTYPE_CODES[x.dtype]
    a.rows, a.cols = rows, cols
    a.row_stride, a.col_stride = x.stride()
    if labels is not None:
        a.labels = labels.data_ptr()
        a.label_stride = labels.stride(0)
    else:
        a.reward_table = reward_table.data_ptr()
        a.reward_dtype = _checks.DTYPE_CODES[reward_table.dtype]
        if reward_table.dim() == 1:
            a.reward_row_stride, a.reward_col_stride = 0, reward_table.stride(0)
        else:
            a.reward_row_stride, a.reward_col_stride = reward_table.stride()
    a.baseline_kind = kind
    a.baseline_value = constant
    if baseline_t is not None:
        a.baseline = baseline_t.data_ptr()
        a.baseline_dtype = _checks.DTYPE_CODES[baseline_t.dtype]
        a.baseline_stride = baseline_t.stride(0)
    a.num_samples = num_samples
    a.seed = seed & (2**64 - 1)
    a.actions = actions.data_ptr()
    a.rewards = rewards.data_ptr()
    a.grad = grad.data_ptr()
    a.num_threads = _native.num_threads()
    flag = None
    if device.type == "cuda":
        if num_samples > _native.PAIRWISE_SAMPLES:
            order = torch.empty((rows, num_samples), dtype=torch.int64, device=device)  # noqa: F841 (kept alive)
            a.order = order.data_ptr()
        res = _native.cuda_call("reinforce_grad", a, device, report=_report(cols, reward_table), seed=seed_t,
                                scratch=True, values=x)
        if res[0] == _status.NONFINITE_REWARD:
            res = res[:4] + (float(reward_table[res[2]] if reward_table.dim() == 1 else reward_table[res[1], res[2]]),)
        if res[0] == _status.NONFINITE_BASELINE:
            res = res[:4] + (float(baseline_t[res[1]]),)
    else:
        if not _warned_unnormalised:
            flag = _UNNORMALISED
            a.unnormalised = flag.data_ptr()
            a.normalised_tol = _NORMALISED_TOL[x.dtype]
        res = _C.reinforce_grad_cpu(a)
    if res[0]:
        _status.raise_for_status(res, **_report(cols, reward_table))
    if flag is not None and int(flag[0]):
        warn_unnormalised()
    return actions, rewards, grad


@torch.library.custom_op("pgest::reinforce_grad", mutates_args=())
def reinforce_grad_op(log_probs: Tensor, labels: Optional[Tensor], reward_table: Optional[Tensor],
                        baseline_kind: int, baseline_value: float, baseline: Optional[Tensor],
                        num_samples: int, seed: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """(B, K) log-probabilities -> (actions (B, S), rewards (B, S) float32,
    grad (B, K)); ``baseline_kind`` 0-4 = none, constant (``baseline_value``),
    tensor (``baseline`` (B,)), mean, rloo; ``seed`` as for ``pgest::sample``."""
    labels, reward_table, baseline = check_call(log_probs, labels, reward_table, baseline_kind, baseline_value,
                                                 baseline, num_samples)
    check_seed(seed, log_probs.device)
    x = log_probs.detach()
    if x.device.type == "cpu":
        return run_kernel(x, labels, reward_table, baseline_kind, baseline_value, baseline, num_samples, int(seed[0]))
    return run_kernel(x, labels, reward_table, baseline_kind, baseline_value, baseline, num_samples, 0, seed_t=seed)


register_refusal(reinforce_grad_op, "pgest.reinforce_grad")


@reinforce_grad_op.register_fake
def _(log_probs, labels, reward_table, baseline_kind, baseline_value, baseline, num_samples, seed):
    check_call(log_probs, labels, reward_table, baseline_kind, baseline_value, baseline, num_samples)
    B, K = log_probs.shape
    return (log_probs.new_empty((B, num_samples), dtype=torch.int64),
            log_probs.new_empty((B, num_samples), dtype=torch.float32), log_probs.new_empty((B, K)))
