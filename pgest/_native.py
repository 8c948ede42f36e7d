"""Loading the native module and launching its kernels (CPU threads, the
CUDA stream and error words)."""
from __future__ import annotations

from typing import Optional

import torch  # noqa: F401  (loads torch's OpenMP runtime first, so _C shares it)

from . import device_errors
from ._status import ACTION_OUT_OF_RANGE, CUDA_ERROR, NONFINITE_INPUT, NONFINITE_REWARD, OK

try:
    from . import _C
except ImportError as e:  # pragma: no cover - depends on how pgest was installed
    raise ImportError(
        "pgest's native module pgest._C is not built here. Install the package with "
        "`pip install .` and import it from outside the source tree (a checkout's "
        "pgest/ directory on sys.path shadows the installed one)."
    ) from e

PAIRWISE_SAMPLES = 16  # kPairwiseSamples of csrc/include/pgest/action_groups.h


CUDA_COMPILED = bool(_C.build_info()["cuda_compiled"])


CPU = torch.device("cpu")


def device_of(x: torch.Tensor) -> torch.device:
    """x.device, without building a device object for a CPU tensor: the hot
    paths allocate on the input's device at every call, and a fresh
    torch.device costs about as much as one of those allocations."""
    return CPU if x.is_cpu else x.device


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


def functorch_active() -> bool:
    """Under torch.func transforms (grad, vmap, jacrev), including the
    batched gradients of gradcheck(check_batched_grad=True)."""
    return torch._C._are_functorch_transforms_active()


def traced() -> bool:
    """Whether the registered ops must be used: under torch.compile, and under
    torch.func transforms (their autograd formulas and vmap rules are what
    those transforms run)."""
    return torch.compiler.is_compiling() or functorch_active()


def num_threads() -> int:
    return max(1, torch.get_num_threads())
