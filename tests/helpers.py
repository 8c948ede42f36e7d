"""What the tests share: dtypes, tolerances, the devices present, and the
uniforms an op drew. (Fixtures and options are in conftest.py.)"""
import functools
import inspect

import pytest
import torch

import pgest

FLOAT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

# Gradient tolerances per dtype, in one place: kernel and reference both form
# each entry in float64 and round once, so they differ only where a float64
# sum (the batch mean) is taken in another order.
TOL = {
    torch.float64: dict(rtol=1e-12, atol=1e-15),
    torch.float32: dict(rtol=1e-6, atol=1e-9),
    torch.float16: dict(rtol=1e-3, atol=1e-7),
    torch.bfloat16: dict(rtol=8e-3, atol=1e-7),
}


# The devices present: every op test parametrised over DEVICES runs on the
# GPU too wherever one is (the CUDA kernels' only test bed).
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def devices():
    """pytest.mark.parametrize over DEVICES, with the device in the test id."""
    return pytest.mark.parametrize("device", DEVICES, ids=[f"on-{d}" for d in DEVICES])


def on_each_device(test):
    """Parametrise ``test`` over DEVICES and run its body with torch's default
    device set to the one of the case (``with torch.device(...)``): every
    tensor it makes without naming a device is made there, its literals too.
    Generators are not: a body that seeds its own takes them from gen()."""

    @functools.wraps(test)
    def run(*args, device, **kwargs):
        with torch.device(device):
            return test(*args, **kwargs)

    sig = inspect.signature(test)
    run.__signature__ = sig.replace(parameters=[*sig.parameters.values(),
                                                inspect.Parameter("device", inspect.Parameter.KEYWORD_ONLY)])
    return devices()(run)


def gen(seed: int, device="cpu") -> torch.Generator:
    """A generator on ``device`` (pgest draws from the input's device's
    generator), seeded."""
    return torch.Generator(device=device).manual_seed(seed)


def on_cpu(out):
    """``out`` with every tensor in it moved to the CPU, NamedTuples (nested
    records such as TruncatedSample) rebuilt as their own type: a test
    parametrised over DEVICES compares with its CPU reference through it."""
    if isinstance(out, torch.Tensor):
        return out.cpu()
    if isinstance(out, tuple):
        items = [on_cpu(o) for o in out]
        return type(out)(*items) if hasattr(out, "_fields") else tuple(items)
    return out


def run_with_noise(fn, *args, generator_seed=0, num_samples=1, **kwargs):
    """Run a pgest op with a fresh generator and return (output, uniforms):
    the uniforms the kernel drew, recovered from the same generator state."""
    g = torch.Generator().manual_seed(generator_seed)
    state = g.get_state()
    out = fn(*args, num_samples=num_samples, generator=g, **kwargs)
    g.set_state(state)
    x = args[0]
    seed, offset = pgest.philox.next_seed_offset(g, x.device, num_samples)
    return out, pgest.philox.uniforms(x.shape[0], num_samples, seed, offset)


def head_case(N: int, H: int, V: int, pad: int):
    """float64 hidden (N, H), weight (V, H), bias (V,), actions (N,) with
    token ``pad`` ignored (-100), advantages (N,): a small fused-head case."""
    h, w, b = (torch.randn(N, H, dtype=torch.float64), torch.randn(V, H, dtype=torch.float64),
               torch.randn(V, dtype=torch.float64))
    a = torch.randint(0, V, (N,))
    a[pad] = -100
    return h, w, b, a, torch.randn(N, dtype=torch.float64)


def each_isa(fn):
    """fn() under every instruction set this CPU runs, by name (the CPU
    kernels' vector width differs: 4, 8 or 16 float lanes)."""
    from pgest import _C

    isa = _C.cpu_isa()
    out = {}
    try:
        for name in ["generic", "avx2", "avx512"]:
            if _C.set_cpu_isa(name):
                out[name] = fn()
    finally:
        _C.set_cpu_isa(isa)
    return out
