"""reinforce_grad vs the reference recipe, the compiled formulation and a copy,
timed in alternation (bench/harness.py: interleaved_medians: this machine's
speed drifts by more than the gaps between tests).

    pytest bench/bench_reinforce_grad.py --benchmark-json bench/results/cpu.json
    python bench/report.py bench/results/cpu.json
"""
import pytest
import torch
from harness import compiled, gumbel_formulation, record_interleaved

import pgest
from pgest.reference import recipe_step

# no pool of compile workers busy in the background while timing
torch._inductor.config.compile_threads = 1
# one compiled function is traced at every (shape, dtype)
torch._dynamo.config.recompile_limit = 64

SHAPES = [(32768, 2), (4096, 10), (1024, 1000), (256, 32000), (64, 128000)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make(B, K, dtype):
    g = torch.Generator().manual_seed(0)
    log_probs = torch.randn(B, K, generator=g).log_softmax(-1).to(dtype)
    labels = torch.randint(0, K, (B,), generator=g)
    baseline = torch.rand(B, generator=g)
    return log_probs, labels, baseline


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_reinforce_grad(benchmark, shape, dtype):
    log_probs, labels, baseline = make(*shape, DTYPES[dtype])
    f = compiled(gumbel_formulation)
    fns = {"pgest": lambda: pgest.reinforce_grad(log_probs, labels, baseline=baseline),
           "recipe": lambda: recipe_step(log_probs, labels, baseline),
           "compiled": lambda: f(log_probs, labels, baseline),
           "copy": lambda: log_probs.clone()}
    record_interleaved(benchmark, "reinforce_grad", shape, dtype, fns)
