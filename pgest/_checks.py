"""Argument checks shared by the ops, each raising an exception that names
the argument and what was wrong. A leaf: nothing here imports the rest of
the package (the native module only tells whether CUDA kernels were built)."""
from __future__ import annotations

import numbers
from typing import Optional

import torch

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
