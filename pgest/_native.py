"""Loading the native module, dtype codes, and turning kernel status codes
into exceptions that name the argument at fault."""
from __future__ import annotations

import math
import re
from typing import Optional

import torch  # noqa: F401  (loads torch's OpenMP runtime first, so _C shares it)

from . import device_errors

try:
    from . import _C
except ImportError as e:  # pragma: no cover - depends on how pgest was installed
    raise ImportError(
        "pgest's native module pgest._C is not built here. Install the package with "
        "`pip install .` and import it from outside the source tree (a checkout's "
        "pgest/ directory on sys.path shadows the installed one)."
    ) from e

DTYPE_CODES = {
    torch.float32: 0,
    torch.float64: 1,
    torch.float16: 2,
    torch.bfloat16: 3,
}
FLOAT_DTYPES = tuple(DTYPE_CODES)

# Mirrors csrc/include/pgest/status.h.
OK = 0
NONFINITE_INPUT = 1
ALL_NEG_INF = 2
LABEL_OUT_OF_RANGE = 3
NONFINITE_REWARD = 4
NONFINITE_BASELINE = 5
UNSUPPORTED_DTYPE = 6
OUT_OF_MEMORY = 8
CUDA_ERROR = 9
ACTION_OUT_OF_RANGE = 11
PAIRWISE_SAMPLES = 16  # kPairwiseSamples of csrc/include/pgest/action_groups.h


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """Per-row statistics (log-sum-exp, entropy, log-probabilities, losses) are
    kept in the accumulation type: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def row_index(row: int, lead_shape) -> str:
    """A flattened row number as the index of the caller's leading dimensions."""
    if len(lead_shape) <= 1:
        return str(row)
    idx = []
    for size in reversed(lead_shape):
        idx.append(row % size)
        row //= size
    return ", ".join(str(i) for i in reversed(idx))


def unflatten_message(msg: str, lead_shape) -> str:
    """Kernel messages count flattened rows; name the caller's indices instead."""
    m = re.match(r"(\w+)\[(\d+)(.*)", msg)
    if m and len(lead_shape) > 1:
        return f"{m.group(1)}[{row_index(int(m.group(2)), lead_shape)}{m.group(3)}"
    return msg


def raise_for_status(result, *, input_name: str, num_actions: int, table_is_vector: bool = False,
                     lead_shape=None, samples_per_row: int = 1, ignore_index=None) -> None:
    """Raise the exception for a kernel's (status, row, col, index, value).
    ``index`` and ``value`` are None where they were not read back (errors
    deferred from the GPU keep only the status, the row and the column)."""
    status, row, col, index, value = result
    if status == OK:
        return
    where = row_index(row, lead_shape) if lead_shape is not None else str(row)
    if status == NONFINITE_INPUT:
        what = "NaN or +inf" if value is None else value
        raise ValueError(
            f"{input_name}[{where}, {col}] is {what}: scores must be finite or -inf "
            "(NaN and +inf rows cannot be sampled from)"
        )
    if status == ALL_NEG_INF:
        raise ValueError(f"{input_name}[{where}] is all -inf: no action has positive probability")
    if status == ACTION_OUT_OF_RANGE:
        at = f"{where}, {col}" if samples_per_row > 1 else where
        also = f" and is not ignore_index ({ignore_index})" if ignore_index is not None else ""
        value_of = "" if index is None else f" = {index}"
        raise IndexError(f"actions[{at}]{value_of} is out of range for {num_actions} actions{also}")
    if status == LABEL_OUT_OF_RANGE:
        # the kernels report the label itself in the column word
        label = col if index is None else index
        raise IndexError(f"labels[{row}] = {label} is out of range for {num_actions} actions")
    if status == NONFINITE_REWARD:
        where = f"reward_table[{col}]" if table_is_vector else f"reward_table[{row}, {col}]"
        if value is None:
            raise ValueError(f"{where} (sampled in row {row}) is not finite: rewards must be finite, and fit the "
                             "type they are kept in")
        if math.isfinite(value):
            raise ValueError(f"{where} = {value} (sampled in row {row}) overflows float32, the type rewards "
                             "are kept in")
        raise ValueError(f"{where} is {value} (sampled in row {row}): rewards must be finite")
    if status == NONFINITE_BASELINE:
        if value is None:
            raise ValueError(f"baseline[{row}] is not finite: baselines must be finite, and fit the type rewards "
                             "are kept in")
        if math.isfinite(value):
            raise ValueError(f"baseline[{row}] = {value} overflows float32, the type rewards are kept in")
        raise ValueError(f"baseline[{row}] is {value}: baselines must be finite")
    if status == OUT_OF_MEMORY:
        raise MemoryError("pgest: could not allocate per-thread scratch")
    if status == UNSUPPORTED_DTYPE:
        raise TypeError(f"{input_name}: dtype not supported by the native kernel")
    raise RuntimeError(f"pgest kernel failed with status {status} (row {row}, col {col}, index {index})")


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


CUDA_COMPILED = bool(_C.build_info()["cuda_compiled"])


CPU = torch.device("cpu")


def device_of(x: torch.Tensor) -> torch.device:
    """x.device, without building a device object for a CPU tensor: the hot
    paths allocate on the input's device at every call, and a fresh
    torch.device costs about as much as one of those allocations."""
    return CPU if x.is_cpu else x.device


def check_device_supported(x: torch.Tensor, name: str) -> None:
    """pgest runs on CPU tensors, and on CUDA tensors when built with CUDA."""
    if x.is_cpu:
        return
    if x.is_cuda:
        if not CUDA_COMPILED:
            raise RuntimeError(
                f"{name} is on {x.device}, but this pgest build has no CUDA kernels "
                "(rebuild where nvcc is found, or with PGEST_CUDA=ON)"
            )
        return
    raise NotImplementedError(f"{name} is on {x.device}: pgest runs on CPU and CUDA tensors")


def cuda_call(kernel: str, args, device: torch.device, *, report: Optional[dict] = None, seed=None,
              scratch: bool = False, values=None, actions=None):
    """Launch ``<kernel>_cuda`` on ``device``'s current stream and return the
    (status, row, col, index, value) of raise_for_status.

    ``report``: the raise_for_status keyword arguments of this call's
    messages, for a kernel that checks the data (None: it checks nothing, and
    no error word is made). The kernels write the lowest failing row into a
    device word; by default that word is handed to pgest.device_errors and
    read later without stalling the stream (the result is then OK here);
    under ``pgest.sync_errors()`` it is read now (one synchronisation) and
    ``values``/``actions`` (2-D) fill in the offending value or action.
    Inside CUDA-graph capture nothing is read."""
    err = torch.full((2,), device_errors.NO_ERROR, dtype=torch.int64, device=device) if report is not None else None
    scr = torch.empty(1, dtype=torch.float64, device=device) if scratch else None
    stream = torch.cuda.current_stream(device)
    res = getattr(_C, kernel + "_cuda")(args, device.index, stream.cuda_stream, 0 if err is None else err.data_ptr(),
                                         0 if seed is None else seed.data_ptr(),
                                         0 if scr is None else scr.data_ptr())
    if res[0] == CUDA_ERROR:
        raise RuntimeError(f"pgest: CUDA kernel {kernel} failed: {_C.cuda_error_string(int(res[3]))}")
    if err is None or res[0] != OK or torch.cuda.is_current_stream_capturing():
        return res
    if not device_errors.synchronous():
        device_errors.defer(err, stream, f"pgest {kernel}", report)
        return res
    packed, col = err.tolist()
    if packed == device_errors.NO_ERROR:
        return (OK, -1, -1, 0, 0.0)
    status, row = packed & 31, packed >> 5
    index, value = col, float("nan")
    if status == NONFINITE_INPUT and values is not None:
        value = float(values[row, col])
    if status == ACTION_OUT_OF_RANGE and actions is not None:
        index = int(actions[row, col])
    if status == NONFINITE_REWARD and values is not None:
        value = float(values[row, col]) if values.dim() == 2 else float(values[col])
    return (status, row, col, index, value)


def empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.empty for the hot paths: sizes as separate ints parse in half the
    time of a torch.Size or tuple (about 1 us against 2 here, per tensor, four
    or five tensors a call at RL sizes)."""
    return torch.empty(*shape, dtype=dtype, device=device) if shape else torch.empty((), dtype=dtype, device=device)


def num_threads() -> int:
    return max(1, torch.get_num_threads())
