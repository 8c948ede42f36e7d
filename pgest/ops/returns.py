"""The returns kernels' launch, their registration as torch ops (fake
kernels, autograd, vmap) and the eager fast path; the public functions are
in pgest/returns.py."""
import numbers
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _C, _checks, _native, _status

_DTYPES = {torch.float32: 0, torch.float64: 1}


def check_rate(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return value


def _check_rollout(rewards, dones, last_value, values=None):
    """Everything the kernels need for memory safety, checked by the
    registered ops themselves (they are public)."""
    _checks.check_tensor(rewards, "rewards")
    if rewards.dtype not in _DTYPES:
        raise TypeError(f"rewards must be float32 or float64, got {rewards.dtype}")
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be time-major (T, B), got shape {tuple(rewards.shape)}")
    _checks.check_device_supported(rewards, "rewards")
    tensors = [("dones", dones)] + ([("values", values)] if values is not None else [])
    for name, t in tensors:
        _checks.check_tensor(t, name)
        if t.shape != rewards.shape:
            raise ValueError(f"{name} must have the shape of rewards {tuple(rewards.shape)}, got {tuple(t.shape)}")
        _checks.check_device(t, name, rewards.device, "rewards")
    if values is not None and values.dtype != rewards.dtype:
        raise TypeError(f"values must have the dtype of rewards ({rewards.dtype}), got {values.dtype}")
    if dones.dtype.is_complex:
        raise TypeError(f"dones must be bool or 0/1 numbers, got {dones.dtype}")
    if last_value is not None:
        _checks.check_tensor(last_value, "last_value", "a torch.Tensor or None")
        if last_value.shape != rewards.shape[1:]:
            raise ValueError(f"last_value must have shape ({rewards.shape[1]},), got {tuple(last_value.shape)}")
        if last_value.dtype.is_complex:
            raise TypeError(f"last_value must be a real tensor, got {last_value.dtype}")
        _checks.check_device(last_value, "last_value", rewards.device, "rewards")


def _args(rewards: Tensor, dones: Tensor, last_value: Optional[Tensor], gamma: float) -> "_C.ReturnsArgs":
    a = _C.ReturnsArgs()
    a.dtype = _DTYPES[rewards.dtype]
    a.steps, a.envs = rewards.shape
    a.rewards = rewards.data_ptr()
    a.dones = dones.data_ptr()
    a.dones_type = _DONES_TYPES[dones.dtype]
    a.last_value = 0 if last_value is None else last_value.data_ptr()
    a.gamma = gamma
    a.num_threads = _native.num_threads()
    return a


def _launch(kernel: str, a, device: torch.device) -> None:
    # The scans check nothing in the data (NaN flows through as in torch): no error word.
    res = _native.cuda_call(kernel, a, device) if device.type == "cuda" else getattr(_C, kernel + "_cpu")(a)
    _status.raise_for_status(res, input_name="rewards", num_actions=0)


_DONES_TYPES = {torch.uint8: 0, torch.float32: 1, torch.float64: 2}


def _dones_in_place(dones: Tensor) -> Tensor:
    """dones as the kernel reads them in place (nonzero = done): bool and
    int8 as bytes, float32/float64 as they are; other types cost one pass."""
    d = dones.detach()
    if d.dtype in (torch.bool, torch.int8):
        d = d.view(torch.uint8)
    elif d.dtype not in _DONES_TYPES:
        d = (d != 0).view(torch.uint8)
    return d.contiguous()


def _prepared(rewards, dones, last_value, gamma, lam=0.0):
    check_rate(gamma, "gamma")
    check_rate(lam, "lam")
    rewards = rewards.detach().contiguous()
    if last_value is not None:
        last_value = last_value.detach().to(rewards.dtype).contiguous()
    return rewards, _dones_in_place(dones), last_value


def returns_impl(rewards: Tensor, dones: Tensor, gamma: float, last_value: Optional[Tensor]) -> Tensor:
    _check_rollout(rewards, dones, last_value)
    rewards, dones, last_value = _prepared(rewards, dones, last_value, gamma)
    out = torch.empty_like(rewards)
    a = _args(rewards, dones, last_value, gamma)
    a.out = out.data_ptr()
    _launch("discounted_returns", a, rewards.device)
    return out


returns_op = torch.library.custom_op("pgest::discounted_returns", mutates_args=())(returns_impl)


@returns_op.register_fake
def _(rewards, dones, gamma, last_value):
    _check_rollout(rewards, dones, last_value)
    return torch.empty_like(rewards, memory_format=torch.contiguous_format)


def gae_impl(rewards: Tensor, values: Tensor, dones: Tensor, gamma: float, lam: float,
              last_value: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    _checks.check_tensor(values, "values")  # None would pass _check_rollout as "no values"
    _check_rollout(rewards, dones, last_value, values)
    rewards, dones, last_value = _prepared(rewards, dones, last_value, gamma, lam)
    values = values.detach().contiguous()
    adv, ret = torch.empty_like(rewards), torch.empty_like(rewards)
    a = _args(rewards, dones, last_value, gamma)
    a.values, a.lam, a.out, a.out_ret = values.data_ptr(), lam, adv.data_ptr(), ret.data_ptr()
    _launch("gae", a, rewards.device)
    return adv, ret


gae_op = torch.library.custom_op("pgest::gae", mutates_args=())(gae_impl)


@gae_op.register_fake
def _(rewards, values, dones, gamma, lam, last_value):
    _checks.check_tensor(values, "values")
    _check_rollout(rewards, dones, last_value, values)
    return (torch.empty_like(rewards, memory_format=torch.contiguous_format),
            torch.empty_like(rewards, memory_format=torch.contiguous_format))


def _not_differentiable(op: str):
    def backward(ctx, *grads):
        raise RuntimeError(
            f"pgest.{op} is not differentiable: rollout returns and advantages are constants of the "
            "policy-gradient loss. pgest.gae / pgest.discounted_returns detach their inputs; when calling "
            f"torch.ops.pgest.{op} directly, pass values.detach()")
    return backward


returns_op.register_autograd(_not_differentiable("discounted_returns"))


gae_op.register_autograd(_not_differentiable("gae"))
