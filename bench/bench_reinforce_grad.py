"""reinforce_grad vs the seed's listing, the compiled formulation and a copy.

    pytest bench/bench_reinforce_grad.py --benchmark-json bench/results/cpu.json
    python bench/report.py bench/results/cpu.json
"""
import pytest
import torch

import pgest

from pgest.benchmarks import allocated_bytes, compiled, gumbel_formulation, seed_listing

# no pool of compile workers busy in the background while timing
torch._inductor.config.compile_threads = 1

SHAPES = [(32768, 2), (4096, 10), (1024, 1000), (256, 32000), (64, 128000)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PROVIDERS = ["pgest", "seed", "compiled", "copy"]


def make(B, K, dtype):
    g = torch.Generator().manual_seed(0)
    log_probs = torch.randn(B, K, generator=g).log_softmax(-1).to(dtype)
    labels = torch.randint(0, K, (B,), generator=g)
    baseline = torch.rand(B, generator=g)
    return log_probs, labels, baseline


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_reinforce_grad(benchmark, shape, dtype, provider):
    log_probs, labels, baseline = make(*shape, DTYPES[dtype])
    if provider == "pgest":
        fn = lambda: pgest.reinforce_grad(log_probs, labels, baseline=baseline)  # noqa: E731
    elif provider == "seed":
        fn = lambda: seed_listing(log_probs, labels, baseline)  # noqa: E731
    elif provider == "compiled":
        f = compiled(gumbel_formulation)
        f(log_probs, labels, baseline)  # compile outside the timing
        fn = lambda: f(log_probs, labels, baseline)  # noqa: E731
    else:
        fn = lambda: log_probs.clone()  # noqa: E731
    benchmark.group = f"reinforce_grad {shape[0]}x{shape[1]} {dtype}"
    benchmark.extra_info.update(op="reinforce_grad", shape=list(shape), dtype=dtype, provider=provider,
                                bytes=log_probs.numel() * log_probs.element_size() * 2,
                                alloc_bytes=allocated_bytes(fn))
    benchmark.pedantic(fn, rounds=15, iterations=1, warmup_rounds=2)
