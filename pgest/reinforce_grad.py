"""pgest.reinforce_grad: the seed's policy-gradient step, fused.

Samples actions from each row of log-probabilities, rewards them, subtracts a
baseline and returns the one-hot score gradient that ``log_probs.backward``
takes, in one pass over the rows with no (B, K) temporary besides the
gradient itself.
"""
from __future__ import annotations

import numbers
from typing import NamedTuple, Optional, Union

import torch

from . import _C
from . import _native as nat
from .philox import next_seed_offset, seed_tensor

BASELINE_NAMES = ("mean", "rloo")
_KIND = {"none": 0, "constant": 1, "tensor": 2, "mean": 3, "rloo": 4}


class ReinforceGrad(NamedTuple):
    actions: torch.Tensor  # int64 (B,) or (B, S)
    rewards: torch.Tensor  # float32, same shape
    grad: torch.Tensor     # (B, K), dtype of log_probs


def _check_labels(labels, rows: int, device: torch.device) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor of integers, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if labels.dim() != 1 or labels.shape[0] != rows:
        raise ValueError(f"labels must have shape ({rows},) to match log_probs, got {tuple(labels.shape)}")
    nat.check_device(labels, "labels", device, "log_probs")
    return labels.to(torch.int64)


def _check_reward_table(table, rows: int, cols: int, device: torch.device) -> torch.Tensor:
    nat.check_float_tensor(table, "reward_table")
    if tuple(table.shape) not in ((rows, cols), (cols,)):
        raise ValueError(
            f"reward_table must have shape ({rows}, {cols}) or ({cols},) to match log_probs, "
            f"got {tuple(table.shape)}"
        )
    nat.check_device(table, "reward_table", device, "log_probs")
    return table.detach()


def _resolve_baseline(baseline, rows: int, num_samples: int, device: torch.device):
    """-> (kind, constant, tensor or None)."""
    if baseline is None:
        return _KIND["none"], 0.0, None
    if isinstance(baseline, str):
        if baseline not in BASELINE_NAMES:
            raise ValueError(f"baseline must be None, a float, a (B,) tensor, 'mean' or 'rloo'; got {baseline!r}")
        if baseline == "rloo" and num_samples < 2:
            raise ValueError("baseline='rloo' (leave-one-out) needs num_samples >= 2")
        return _KIND[baseline], 0.0, None
    if isinstance(baseline, bool):
        raise TypeError("baseline must be None, a float, a (B,) tensor, 'mean' or 'rloo'; got a bool")
    if isinstance(baseline, numbers.Real):
        value = float(baseline)
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"baseline must be finite, got {value}")
        return _KIND["constant"], value, None
    if isinstance(baseline, torch.Tensor):
        nat.check_float_tensor(baseline, "baseline")
        if baseline.dim() != 1 or baseline.shape[0] != rows:
            raise ValueError(
                f"baseline tensor must have shape ({rows},), one value per row, got {tuple(baseline.shape)}"
            )
        nat.check_device(baseline, "baseline", device, "log_probs")
        # A learned value head: used as a constant, never differentiated through.
        return _KIND["tensor"], 0.0, baseline.detach()
    raise TypeError(
        f"baseline must be None, a float, a (B,) tensor, 'mean' or 'rloo'; got {type(baseline).__name__}"
    )


def reinforce_grad(
    log_probs: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    *,
    reward_table: Optional[torch.Tensor] = None,
    baseline: Union[None, float, str, torch.Tensor] = None,
    num_samples: int = 1,
    generator: Optional[torch.Generator] = None,
) -> ReinforceGrad:
    """Sample, reward, subtract a baseline and build the one-hot score gradient.

    Args:
        log_probs: (B, K) float32/float64/float16/bfloat16 log-probabilities,
            any strides. Unnormalised logits work too: each row is normalised
            inside the pass (fp32 accumulation for 16-bit inputs, fp64 for fp64).
        labels: (B,) integer labels; reward 1.0 where the action equals the
            label, else 0.0 (the seed's "guess the label" reward).
        reward_table: instead of labels, a (B, K) or (K,) float table; the
            reward of action a in row i is ``reward_table[i, a]``.
        baseline: None (0), a float, a (B,) tensor (a value head's output, used
            but never differentiated), ``"mean"`` (mean reward of the batch,
            each sample's own reward included: a bias of order 1 / (B * S)) or
            ``"rloo"`` (mean of the other ``num_samples - 1`` rewards of the
            row: unbiased).
        num_samples: S >= 1 independent draws per row.
        generator: a ``torch.Generator`` of the input's device; default: torch's
            default generator of that device.

    Returns:
        ``ReinforceGrad(actions, rewards, grad)``: int64 actions and float32
        rewards of shape (B,) when S == 1, else (B, S); ``grad`` (B, K) in the
        dtype of ``log_probs`` holding ``sum_s (b_is - r_is) / (B * S)`` at each
        sampled action and 0 elsewhere. ``log_probs.backward(grad)`` is then the
        seed's step 3.
    """
    nat.check_float_tensor(log_probs, "log_probs")
    if log_probs.dim() != 2:
        raise ValueError(f"log_probs must be 2-D (B, K), got shape {tuple(log_probs.shape)}")
    rows, cols = log_probs.shape
    device = log_probs.device
    nat.check_device_supported(log_probs, "log_probs")
    if isinstance(num_samples, bool) or not isinstance(num_samples, numbers.Integral):
        raise TypeError(f"num_samples must be an int, got {type(num_samples).__name__}")
    num_samples = int(num_samples)
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if (labels is None) == (reward_table is None):
        raise ValueError("pass exactly one of labels and reward_table")
    if rows > 0 and cols == 0:
        raise ValueError("log_probs has K = 0 actions: there is nothing to sample")
    if labels is not None:
        labels = _check_labels(labels, rows, device)
    else:
        reward_table = _check_reward_table(reward_table, rows, cols, device)
    kind, constant, baseline_t = _resolve_baseline(baseline, rows, num_samples, device)

    actions = torch.empty((rows, num_samples), dtype=torch.int64, device=device)
    rewards = torch.empty((rows, num_samples), dtype=torch.float32, device=device)
    grad = torch.empty((rows, cols), dtype=log_probs.dtype, device=device)
    if rows > 0:
        on_cuda = device.type == "cuda"
        seed_t = seed_tensor(generator, device) if on_cuda else None
        seed, offset = (0, 0) if on_cuda else next_seed_offset(generator, device, num_samples)
        x = log_probs.detach()
        a = _C.ReinforceGradArgs()
        a.log_probs = x.data_ptr()
        a.dtype = nat.DTYPE_CODES[x.dtype]
        a.rows, a.cols = rows, cols
        a.row_stride, a.col_stride = x.stride()
        if labels is not None:
            a.labels = labels.data_ptr()
            a.label_stride = labels.stride(0)
        else:
            a.reward_table = reward_table.data_ptr()
            a.reward_dtype = nat.DTYPE_CODES[reward_table.dtype]
            if reward_table.dim() == 1:
                a.reward_row_stride, a.reward_col_stride = 0, reward_table.stride(0)
            else:
                a.reward_row_stride, a.reward_col_stride = reward_table.stride()
        a.baseline_kind = kind
        a.baseline_value = constant
        if baseline_t is not None:
            a.baseline = baseline_t.data_ptr()
            a.baseline_dtype = nat.DTYPE_CODES[baseline_t.dtype]
            a.baseline_stride = baseline_t.stride(0)
        a.num_samples = num_samples
        a.seed, a.offset = seed, offset
        a.actions = actions.data_ptr()
        a.rewards = rewards.data_ptr()
        a.grad = grad.data_ptr()
        a.num_threads = nat.num_threads()
        if on_cuda:
            res = nat.cuda_call("reinforce_grad", a, device, seed=seed_t, scratch=True, values=x)
            if res[0] == nat.NONFINITE_REWARD:
                res = res[:4] + (float(reward_table[res[2]] if reward_table.dim() == 1 else reward_table[res[1], res[2]]),)
            if res[0] == nat.NONFINITE_BASELINE:
                res = res[:4] + (float(baseline_t[res[1]]),)
        else:
            res = _C.reinforce_grad_cpu(a)
        nat.raise_for_status(
            res, input_name="log_probs", num_actions=cols,
            table_is_vector=reward_table is not None and reward_table.dim() == 1,
        )
    if num_samples == 1:
        actions, rewards = actions.view(rows), rewards.view(rows)
    return ReinforceGrad(actions, rewards, grad)
