"""policy_loss and reinforce, forward + backward, against
(a) log_softmax + gather + backward in eager PyTorch, (b) the same under
torch.compile, (c) cross_entropy(reduction="none") * advantages, and
(d) a copy of the logits (the memory floor). The bytes each step allocates
(bench/memory.py) are recorded beside its time.

    pytest bench/bench_policy_loss.py --benchmark-json bench/results/cpu.json
"""
import pytest
import torch

import pgest
from pgest.benchmarks import (allocated_bytes, ce_policy_loss, compiled, eager_policy_loss, eager_reinforce,
                              pgest_reinforce, train_step)

SHAPES = [(1024, 1000), (256, 32000), (64, 128000)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make(B, K, dtype):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B, K, generator=g).to(dtype).requires_grad_()
    actions = torch.randint(0, K, (B,), generator=g)
    adv = torch.randn(B, generator=g)
    return logits, actions, adv


POLICY = {
    "pgest": lambda x, a, w: pgest.policy_loss(x, a, w),
    "eager": eager_policy_loss,
    "compiled": None,
    "cross_entropy": ce_policy_loss,
}


@pytest.mark.parametrize("provider", list(POLICY) + ["copy"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_policy_loss_fwd_bwd(benchmark, shape, dtype, provider):
    logits, actions, adv = make(*shape, DTYPES[dtype])
    if provider == "copy":
        x = logits.detach()
        run = lambda: x.clone()  # noqa: E731
    else:
        fn = compiled(eager_policy_loss) if provider == "compiled" else POLICY[provider]
        run = train_step(fn, logits, actions, adv)
        run()  # compile / warm up outside the timing
    benchmark.group = f"policy_loss {shape[0]}x{shape[1]} {dtype}"
    benchmark.extra_info.update(op="policy_loss fwd+bwd", shape=list(shape), dtype=dtype, provider=provider,
                                alloc_bytes=allocated_bytes(run))
    benchmark.pedantic(run, rounds=15, iterations=1, warmup_rounds=2)


@pytest.mark.parametrize("provider", ["pgest", "eager", "compiled", "copy"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_reinforce_fwd_bwd(benchmark, shape, provider):
    logits, labels, _ = make(*shape, torch.float32)
    if provider == "copy":
        x = logits.detach()
        run = lambda: x.clone()  # noqa: E731
    elif provider == "pgest":
        run = train_step(pgest_reinforce, logits, labels)
    else:
        fn = compiled(eager_reinforce) if provider == "compiled" else eager_reinforce
        run = train_step(fn, logits, labels)
    run()
    benchmark.group = f"reinforce {shape[0]}x{shape[1]} fp32"
    benchmark.extra_info.update(op="reinforce fwd+bwd (S=4, rloo)", shape=list(shape), dtype="fp32",
                                provider=provider, alloc_bytes=allocated_bytes(run))
    benchmark.pedantic(run, rounds=15, iterations=1, warmup_rounds=2)
