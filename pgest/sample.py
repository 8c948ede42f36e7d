"""pgest.sample: draw actions from logits, with their log-probabilities and the
entropy of each row, in one read of the logits (no softmax is materialised).

Registered as the torch op ``pgest::sample``.
"""
from __future__ import annotations

import numbers
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from . import _C
from . import _native as nat
from .philox import seed_tensor


class Sample(NamedTuple):
    actions: Tensor   # int64 (...,) or (..., S)
    log_prob: Tensor  # log softmax(logits)[action], same shape as actions
    entropy: Tensor   # (...,) entropy of softmax(logits) per row


@torch.library.custom_op("pgest::sample", mutates_args=())
def sample_rows(logits: Tensor, num_samples: int, seed: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(R, K) logits -> actions (R, S), log_prob (R, S), entropy (R,), lse (R,).
    ``seed`` is the (2,) int64 (seed, offset) of :func:`pgest.philox.seed_tensor`."""
    R, K = logits.shape
    acc = nat.stats_dtype(logits.dtype)
    dev = logits.device
    actions = torch.empty((R, num_samples), dtype=torch.int64, device=dev)
    log_prob = torch.empty((R, num_samples), dtype=acc, device=dev)
    entropy = torch.empty((R,), dtype=acc, device=dev)
    lse = torch.empty((R,), dtype=acc, device=dev)
    if R:
        a = _C.SampleArgs()
        a.logits = logits.data_ptr()
        a.dtype = nat.DTYPE_CODES[logits.dtype]
        a.rows, a.cols = R, K
        a.row_stride, a.col_stride = logits.stride()
        a.num_samples = num_samples
        if dev.type == "cpu":
            a.seed, a.offset = int(seed[0]) & (2**64 - 1), int(seed[1])
        a.actions, a.log_prob, a.entropy, a.lse = (
            actions.data_ptr(), log_prob.data_ptr(), entropy.data_ptr(), lse.data_ptr())
        a.num_threads = nat.num_threads()
        res = nat.cuda_call("sample", a, dev, seed=seed, values=logits) if dev.type == "cuda" else _C.sample_cpu(a)
        nat.raise_for_status(res, input_name="logits", num_actions=K)
    return actions, log_prob, entropy, lse


@sample_rows.register_fake
def _(logits, num_samples, seed):
    R = logits.shape[0]
    acc = nat.stats_dtype(logits.dtype)
    return (logits.new_empty((R, num_samples), dtype=torch.int64), logits.new_empty((R, num_samples), dtype=acc),
            logits.new_empty((R,), dtype=acc), logits.new_empty((R,), dtype=acc))


def check_logits(logits, name: str = "logits") -> None:
    nat.check_float_tensor(logits, name)
    if logits.dim() < 1:
        raise ValueError(f"{name} must have at least 1 dimension (..., K), got a scalar")
    nat.check_device_supported(logits, name)
    if logits.shape[-1] == 0 and logits.shape[:-1].numel() > 0:
        raise ValueError(f"{name} has K = 0 actions: there is nothing to sample")


def check_num_samples(num_samples) -> int:
    if isinstance(num_samples, bool) or not isinstance(num_samples, numbers.Integral):
        raise TypeError(f"num_samples must be an int, got {type(num_samples).__name__}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    return int(num_samples)


def rows_of(logits: Tensor) -> Tensor:
    """(..., K) -> (R, K), a view whenever the leading dimensions allow one."""
    return logits.reshape(-1, logits.shape[-1])


def sample(logits: Tensor, num_samples: int = 1, generator: Optional[torch.Generator] = None) -> Sample:
    """Draw ``num_samples`` actions from softmax(logits) per row.

    Args:
        logits: (..., K) float32/float64/float16/bfloat16; leading dimensions
            are rows (token-level use: (B, T, K)). fp32 accumulation for 16-bit
            inputs.
        num_samples: S >= 1 independent draws per row.
        generator: a ``torch.Generator`` of the logits' device (default: torch's
            default generator of that device).

    Returns:
        ``Sample(actions, log_prob, entropy)``: int64 actions of shape (...,)
        when S == 1, else (..., S); ``log_prob`` of those actions, same shape;
        ``entropy`` (...,). Float outputs are float32 (float64 for float64
        logits). Nothing here is differentiable: use :func:`pgest.policy_loss`
        or :func:`pgest.reinforce` for gradients.
    """
    check_logits(logits)
    S = check_num_samples(num_samples)
    lead = logits.shape[:-1]
    seed = seed_tensor(generator, logits.device)
    try:
        actions, log_prob, entropy, _ = sample_rows(rows_of(logits.detach()), S, seed)
    except ValueError as e:
        raise ValueError(nat.unflatten_message(str(e), lead)) from None
    shape = tuple(lead) if S == 1 else tuple(lead) + (S,)
    return Sample(actions.view(shape), log_prob.view(shape), entropy.view(tuple(lead)))
