"""The RL matrix: one PPO minibatch step without the network at the action
spaces classic RL uses. A step is Categorical(logits).sample() + log_prob +
entropy, forward and backward of log_prob + entropy. Providers:
pgest.Categorical, torch.distributions.Categorical, and log_softmax +
multinomial + gather, eager and under torch.compile.

At the small end the providers are tens of microseconds apart and this
machine's speed drifts by more than that between tests, so each shape is one
test that times all providers in alternation (bench/harness.py:
record_interleaved) and records their medians in ``extra_info``; report.py
turns them into the table. pytest-benchmark's own statistics are pgest's.

    pytest bench/bench_log_prob.py --benchmark-json bench/results/cpu-rl.json

A second table times the PPO update's own pattern (log_prob of stored
actions + entropy, no sampling) against the same providers.
"""
import pytest
import torch
from harness import RL_KS as KS
from harness import (
    RL_OP,
    RL_UPDATE_OP,
    compiled,
    record_interleaved,
    rl_providers,
    rl_step_log_softmax,
    rl_update_log_softmax,
    rl_update_pgest,
    rl_update_torch,
    train_step,
)
from harness import RL_ROWS as ROWS

# one compiled function is traced at 16 static shapes
torch._dynamo.config.recompile_limit = 128
# Compile in this process: a pool of compile workers started by the first
# shape keeps a core busy for seconds afterwards, under that shape's timing.
torch._inductor.config.compile_threads = 1


@pytest.mark.parametrize("K", KS)
@pytest.mark.parametrize("rows", ROWS)
def test_rl_step(benchmark, rows, K):
    x = torch.randn(rows, K, generator=torch.Generator().manual_seed(0)).requires_grad_()
    fns = rl_providers(x, compiled(rl_step_log_softmax))
    record_interleaved(benchmark, RL_OP, (rows, K), "fp32", fns, rounds=41, with_memory=False)


@pytest.mark.parametrize("K", KS)
@pytest.mark.parametrize("rows", ROWS)
def test_ppo_update(benchmark, rows, K):
    """The update epochs' pattern: no sampling, log_prob of stored actions."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, K, generator=g).requires_grad_()
    actions, adv = torch.randint(0, K, (rows,), generator=g), torch.randn(rows, generator=g)
    fns = {"pgest": train_step(rl_update_pgest, x, actions, adv),
           "torch_categorical": train_step(rl_update_torch, x, actions, adv),
           "log_softmax_gather": train_step(rl_update_log_softmax, x, actions, adv),
           "log_softmax_gather_compiled": train_step(compiled(rl_update_log_softmax), x, actions, adv)}
    record_interleaved(benchmark, RL_UPDATE_OP, (rows, K), "fp32", fns, rounds=41, with_memory=False)
