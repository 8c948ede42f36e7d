"""policy_loss and reinforce, forward + backward, against
(a) log_softmax + gather + backward in eager PyTorch, (b) the same under
torch.compile, (c) cross_entropy(reduction="none") * advantages, and
(d) a copy of the logits (the memory floor). The bytes each step allocates
(torch.profiler's allocation records) are recorded beside its time. The
providers of a shape are timed in alternation (interleaved_medians).

    pytest bench/bench_policy_loss.py --benchmark-json bench/results/cpu.json
"""
import pytest
import torch
from harness import (
    ce_policy_loss,
    compiled,
    eager_policy_loss,
    eager_reinforce,
    pgest_reinforce,
    record_interleaved,
    train_step,
)

import pgest

# no pool of compile workers busy in the background while timing
torch._inductor.config.compile_threads = 1
torch._dynamo.config.recompile_limit = 64

SHAPES = [(1024, 1000), (256, 32000), (64, 128000)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make(B, K, dtype):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B, K, generator=g).to(dtype).requires_grad_()
    actions = torch.randint(0, K, (B,), generator=g)
    adv = torch.randn(B, generator=g)
    return logits, actions, adv


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_policy_loss_fwd_bwd(benchmark, shape, dtype):
    logits, actions, adv = make(*shape, DTYPES[dtype])
    x = logits.detach()
    fns = {"pgest": train_step(lambda a, b, c: pgest.policy_loss(a, b, c), logits, actions, adv),
           "eager": train_step(eager_policy_loss, logits, actions, adv),
           "compiled": train_step(compiled(eager_policy_loss), logits, actions, adv),
           "cross_entropy": train_step(ce_policy_loss, logits, actions, adv),
           "copy": lambda: x.clone()}
    record_interleaved(benchmark, "policy_loss fwd+bwd", shape, dtype, fns)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_reinforce_fwd_bwd(benchmark, shape):
    logits, labels, _ = make(*shape, torch.float32)
    x = logits.detach()
    fns = {"pgest": train_step(pgest_reinforce, logits, labels),
           "eager": train_step(eager_reinforce, logits, labels),
           "compiled": train_step(compiled(eager_reinforce), logits, labels),
           "copy": lambda: x.clone()}
    record_interleaved(benchmark, "reinforce fwd+bwd (S=4, rloo)", shape, "fp32", fns)
