"""Argument checks shared by the ops, each raising an exception that names
the argument and what was wrong. A leaf: nothing here imports the rest of
the package (the native module only tells whether CUDA kernels were built)."""
from __future__ import annotations

import math
import numbers
from typing import Optional, Tuple

import torch
from torch import Tensor

DTYPE_CODES = {
    torch.float32: 0,
    torch.float64: 1,
    torch.float16: 2,
    torch.bfloat16: 3,
}
FLOAT_DTYPES = tuple(DTYPE_CODES)


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """Per-row statistics (log-sum-exp, entropy, log-probabilities, losses) are
    kept in the accumulation type: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_tensor(x, name: str, what: str = "a torch.Tensor") -> None:
    """A dense (strided) tensor: the kernels index raw memory by strides,
    which sparse and other layouts do not have."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be {what}, got {type(x).__name__}")
    if x.layout != torch.strided:
        raise TypeError(f"{name} must be a dense tensor, got layout {x.layout}: pass {name}.to_dense()")


def as_int64(t: torch.Tensor, name: str, num_actions: int) -> torch.Tensor:
    """An integer index tensor as int64. uint64 entries above 2^63 - 1 would
    wrap to negative numbers in the cast: they are reported as the values the
    caller passed."""
    if t.dtype == torch.uint64:
        v = t.contiguous().view(torch.int64)
        big = (v < 0).nonzero()
        if big.numel():
            at = ", ".join(str(int(i)) for i in big[0])
            raise IndexError(f"{name}[{at}] = {int(v[tuple(big[0])]) + 2**64} is out of range for "
                             f"{num_actions} actions")
        return v
    return t if t.dtype == torch.int64 else t.to(torch.int64)


def check_float_tensor(x, name: str) -> None:
    check_tensor(x, name)
    if x.dtype not in DTYPE_CODES:
        raise TypeError(f"{name} must be float32, float64, float16 or bfloat16, got {x.dtype}")


def check_device(x: torch.Tensor, name: str, ref, ref_name: str) -> None:
    """x on the device of ``ref`` (a tensor, or a torch.device). Two CPU
    tensors are told apart without building device objects (hot paths)."""
    if isinstance(ref, torch.Tensor):
        if x.is_cpu and ref.is_cpu:
            return
        ref = ref.device
    if x.device != ref:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref}")


def check_generator(generator, device: torch.device) -> None:
    """None (torch's default generator) or a torch.Generator of ``device``'s type."""
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if generator.device.type != device.type:
        raise ValueError(f"generator is on {generator.device} but the input is on {device}")


def cuda_compiled() -> bool:
    from . import _C  # the extension module, not a Python module of the package

    return bool(_C.build_info()["cuda_compiled"])


def check_device_supported(x: torch.Tensor, name: str) -> None:
    """pgest runs on CPU tensors, and on CUDA tensors when built with CUDA."""
    if x.is_cpu:
        return
    if x.is_cuda:
        if not cuda_compiled():
            raise RuntimeError(
                f"{name} is on {x.device}, but this pgest build has no CUDA kernels "
                "(rebuild where nvcc is found, or with PGEST_CUDA=ON)"
            )
        return
    raise NotImplementedError(f"{name} is on {x.device}: pgest runs on CPU and CUDA tensors")


def index_tensor(actions: Optional[Tensor], num_actions: int, name: str = "actions") -> Optional[Tensor]:
    """Contiguous int64 actions (the kernels range-check every value)."""
    if actions is None:
        return None
    if actions.dtype != torch.int64 or not actions.is_contiguous():
        actions = as_int64(actions, name, num_actions).contiguous()
    return actions


def check_rows(logits, actions) -> None:
    """What the registered ops need for memory safety, checked by the ops
    themselves (they are public: torch.compile and users call them directly)."""
    check_float_tensor(logits, "logits")
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D (rows, K) here, got shape {tuple(logits.shape)}")
    check_device_supported(logits, "logits")
    if actions is None:
        return
    check_index_dtype(actions)
    if actions.dim() != 2 or actions.shape[0] != logits.shape[0]:
        raise ValueError(f"actions must be 2-D ({logits.shape[0]}, S) to match logits {tuple(logits.shape)}, "
                         f"got {tuple(actions.shape)}")
    check_device(actions, "actions", logits, "logits")


def check_stats(logits, stats, entropy) -> None:
    check_tensor(stats, "stats")
    check_tensor(entropy, "entropy")
    R = logits.shape[0]
    acc = stats_dtype(logits.dtype)
    if stats.shape != (2, R) or stats.dtype != acc:
        raise ValueError(f"stats must be (2, {R}) {acc} (row max, log Z) from pgest::log_prob, "
                         f"got {tuple(stats.shape)} {stats.dtype}")
    if entropy.shape != (R,):
        raise ValueError(f"entropy must have shape ({R},), got {tuple(entropy.shape)}")
    check_device(stats, "stats", logits, "logits")
    check_device(entropy, "entropy", logits, "logits")


def check_upstream(logits, actions, grad_log_prob, grad_entropy) -> None:
    R = logits.shape[0]
    if grad_log_prob is not None:
        S = 0 if actions is None else actions.shape[1]
        check_float_tensor(grad_log_prob, "grad_log_prob")
        if grad_log_prob.shape != (R, S):
            raise ValueError(f"grad_log_prob must have shape ({R}, {S}) like log_prob, "
                             f"got {tuple(grad_log_prob.shape)}")
        check_device(grad_log_prob, "grad_log_prob", logits, "logits")
    if grad_entropy is not None:
        check_float_tensor(grad_entropy, "grad_entropy")
        if grad_entropy.shape != (R,):
            raise ValueError(f"grad_entropy must have shape ({R},) like entropy, got {tuple(grad_entropy.shape)}")
        check_device(grad_entropy, "grad_entropy", logits, "logits")


def check_index_dtype(actions, name: str = "actions") -> None:
    check_tensor(actions, name, "a torch.Tensor of integers")
    if actions.dtype.is_floating_point or actions.dtype.is_complex or actions.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {actions.dtype}")


def check_ignore_index(ignore_index) -> Optional[int]:
    if ignore_index is None:
        return None
    if type(ignore_index) is int and -2**63 <= ignore_index < 2**63:
        return ignore_index  # the common case without the numbers ABCs (a call per step)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if not -2**63 <= ignore_index < 2**63:
        raise ValueError(f"ignore_index must fit in int64, got {ignore_index}")
    return int(ignore_index)


def actions_per_row(logits: Tensor, actions) -> int:
    """S for (...,) actions (1) or (..., S) actions matching logits (..., K)."""
    check_index_dtype(actions)
    lead = logits.shape[:-1]
    if actions.shape == lead:
        return 1
    if actions.dim() == len(lead) + 1 and actions.shape[:-1] == lead:
        return actions.shape[-1]
    raise ValueError(f"actions must have shape {tuple(lead)} (or {tuple(lead)} + (S,)) to match logits "
                     f"{tuple(logits.shape)}, got {tuple(actions.shape)}")


def check_logits(logits, name: str = "logits", empty_ok: bool = False) -> None:
    """``empty_ok``: K = 0 is legal (a rank's empty vocabulary shard)."""
    if (type(logits) is Tensor and logits.is_cpu and logits.dtype in DTYPE_CODES
            and logits.layout == torch.strided and logits.dim() >= 1 and logits.shape[-1]):
        return  # the common case in one expression: a call per step at RL sizes
    check_float_tensor(logits, name)
    if logits.dim() < 1:
        raise ValueError(f"{name} must have at least 1 dimension (..., K), got a scalar")
    check_device_supported(logits, name)
    if logits.shape[-1] == 0 and logits.shape[:-1].numel() > 0 and not empty_ok:
        raise ValueError(f"{name} has K = 0 actions: there is no distribution over them")


def check_num_samples(num_samples) -> int:
    if isinstance(num_samples, bool) or not isinstance(num_samples, numbers.Integral):
        raise TypeError(f"num_samples must be an int, got {type(num_samples).__name__}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    return int(num_samples)


def check_seed(seed, device) -> None:
    if not isinstance(seed, Tensor) or seed.shape != (2,) or seed.dtype != torch.int64:
        raise ValueError("seed must be a (2,) int64 tensor (seed, offset), as pgest.philox.seed_tensor makes")
    check_device(seed, "seed", device, "logits")
    if device.type == "cpu" and int(seed[1]) < 0:
        raise ValueError(f"seed offset must be >= 0, got {int(seed[1])}")


def check_weights(logits, actions, weights, name: str = "weights", ref_name: str = "logits") -> None:
    """(R, S) weights of (R, S) actions in the accumulation dtype of the
    (R, ...) rows ``logits`` (or hidden states), on their device."""
    check_tensor(weights, name)
    R = logits.shape[0]
    acc = stats_dtype(logits.dtype)
    S = actions.shape[1]
    if weights.shape != (R, S) or weights.dtype != acc:
        raise ValueError(f"{name} must be ({R}, {S}) {acc} like actions, got {tuple(weights.shape)} {weights.dtype}")
    check_device(weights, name, logits, ref_name)


def check_entropy_weight(entropy_weight) -> float:
    if (type(entropy_weight) is float or type(entropy_weight) is int) and -1e308 < entropy_weight < 1e308:
        return float(entropy_weight)  # the common case without the numbers ABCs (a call per step)
    if isinstance(entropy_weight, bool) or not isinstance(entropy_weight, numbers.Real):
        raise TypeError(f"entropy_weight must be a float, got {type(entropy_weight).__name__}")
    value = float(entropy_weight)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"entropy_weight must be finite, got {value}")
    return value


def check_head(hidden, weight, bias, temperature, sharded: bool = False) -> float:
    """``sharded``: weight is a rank's vocabulary shard, which may be empty."""
    check_float_tensor(hidden, "hidden")
    if hidden.dim() < 1:
        raise ValueError("hidden must have at least 1 dimension (..., H), got a scalar")
    check_device_supported(hidden, "hidden")
    check_float_tensor(weight, "weight")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be (V, H) with H = {hidden.shape[-1]} (the nn.Linear layout), "
                         f"got {tuple(weight.shape)}")
    if weight.shape[0] == 0 and not sharded:
        raise ValueError("weight has V = 0 rows: there is no vocabulary")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight must have the dtype of hidden ({hidden.dtype}), got {weight.dtype}")
    check_device(weight, "weight", hidden.device, "hidden")
    if bias is not None:
        check_float_tensor(bias, "bias")
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias must have the dtype of hidden ({hidden.dtype}), got {bias.dtype}")
        check_device(bias, "bias", hidden.device, "hidden")
    if isinstance(temperature, bool) or not isinstance(temperature, (numbers.Real, torch.SymFloat, torch.SymInt)):
        raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
    if not isinstance(temperature, torch.SymFloat):  # symbolic under torch.compile(dynamic=True): kept so
        temperature = float(temperature)
    # comparisons, not math.isfinite: they also hold for a symbolic float (NaN fails the first)
    if not (temperature > 0 and temperature < math.inf):
        raise ValueError(f"temperature must be positive and finite, got {temperature}")
    return temperature


def check_tile(value, name: str, default: int) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int or None, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def check_needs(needs) -> None:
    """The registered head ops' ``needs``: which of (hidden, weight, bias) want a gradient."""
    if len(needs) != 3:
        raise ValueError(f"needs must hold 3 flags (hidden, weight, bias), got {len(needs)}")


def check_token_actions(hidden: Tensor, actions) -> Tuple[torch.Size, int]:
    """(leading shape of hidden, actions per token) for (...,) or (..., S) actions."""
    lead = hidden.shape[:-1]
    check_index_dtype(actions)
    if actions.shape == lead:
        S = 1
    elif actions.dim() == len(lead) + 1 and actions.shape[:-1] == lead:
        S = actions.shape[-1]
    else:
        raise ValueError(f"actions must have shape {tuple(lead)} (or {tuple(lead)} + (S,)) to match hidden "
                         f"{tuple(hidden.shape)}, got {tuple(actions.shape)}")
    check_device(actions, "actions", hidden.device, "hidden")
    return lead, S


def check_actions_range(actions: Tensor, V: int, ignore_index: Optional[int]) -> None:
    bad = (actions < 0) | (actions >= V)
    if ignore_index is not None:
        bad &= actions != ignore_index
    where = bad.nonzero()
    if where.numel():
        r, s = int(where[0, 0]), int(where[0, 1])
        at = f"{r}, {s}" if actions.shape[1] > 1 else f"{r}"
        also = f" and is not ignore_index ({ignore_index})" if ignore_index is not None else ""
        raise IndexError(f"actions[{at}] = {int(actions[r, s])} is out of range for {V} actions{also}")


def check_softcap(softcap) -> float:
    """Final logit soft-capping (softcap * tanh(logits / softcap), Gemma 2's
    ``final_logit_softcapping``): None or 0 for none, else a positive finite
    number; returned as a float (0.0 for none)."""
    if softcap is None:
        return 0.0
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real):
        raise TypeError(f"softcap must be a positive number or None, got {type(softcap).__name__}")
    softcap = float(softcap)
    if softcap != 0.0 and not (softcap > 0 and math.isfinite(softcap)):
        raise ValueError(f"softcap must be positive and finite (or None / 0 for no soft-capping), got {softcap}")
    return softcap


def check_head_rows(hidden, weight, bias, actions, temperature):
    check_head(hidden, weight, bias, temperature)
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be 2-D (N, H) here, got shape {tuple(hidden.shape)}")
    check_index_dtype(actions)
    if actions.dim() != 2 or actions.shape[0] != hidden.shape[0]:
        raise ValueError(f"actions must be 2-D ({hidden.shape[0]}, S), got {tuple(actions.shape)}")
    check_device(actions, "actions", hidden.device, "hidden")
