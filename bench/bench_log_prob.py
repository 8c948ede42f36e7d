"""The RL matrix: one PPO minibatch step without the network at the action
spaces classic RL uses. A step is Categorical(logits).sample() + log_prob +
entropy, forward and backward of log_prob + entropy. Providers:
pgest.Categorical, torch.distributions.Categorical, and log_softmax +
multinomial + gather, eager and under torch.compile.

    pytest bench/bench_log_prob.py --benchmark-json bench/results/cpu-rl.json
"""
import pytest
import torch
from torch.distributions import Categorical as TorchCategorical

import pgest
from pgest.benchmarks import compiled

# one compiled function is traced at 16 static shapes
torch._dynamo.config.recompile_limit = 64

ROWS = [64, 512, 4096, 32768]
KS = [2, 6, 18, 100]


def pgest_step(x):
    d = pgest.Categorical(logits=x)
    a = d.sample()
    return d.log_prob(a).sum() + d.entropy().sum()


def torch_step(x):
    d = TorchCategorical(logits=x)
    a = d.sample()
    return d.log_prob(a).sum() + d.entropy().sum()


def lsm_step(x):
    ls = torch.log_softmax(x, -1)
    a = torch.multinomial(ls.detach().exp(), 1)
    return ls.gather(-1, a).sum() - (ls.exp() * ls).sum()


PROVIDERS = {"pgest": pgest_step, "torch_categorical": torch_step, "log_softmax_gather": lsm_step,
             "log_softmax_gather_compiled": None}


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("K", KS)
@pytest.mark.parametrize("rows", ROWS)
def test_rl_step(benchmark, rows, K, provider):
    x = torch.randn(rows, K, generator=torch.Generator().manual_seed(0)).requires_grad_()
    fn = compiled(lsm_step) if provider == "log_softmax_gather_compiled" else PROVIDERS[provider]

    def run():
        x.grad = None
        fn(x).backward()

    run()  # compile / warm up outside the timing
    benchmark.group = f"rl step {rows}x{K} fp32"
    benchmark.extra_info.update(op="Categorical sample + log_prob + entropy fwd+bwd", shape=[rows, K],
                                dtype="fp32", provider=provider)
    benchmark.pedantic(run, rounds=15, iterations=5, warmup_rounds=2)
