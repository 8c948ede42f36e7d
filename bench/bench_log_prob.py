"""The RL matrix: one PPO minibatch step without the network at the action
spaces classic RL uses. A step is Categorical(logits).sample() + log_prob +
entropy, forward and backward of log_prob + entropy. Providers:
pgest.Categorical, torch.distributions.Categorical, and log_softmax +
multinomial + gather, eager and under torch.compile.

    pytest bench/bench_log_prob.py --benchmark-json bench/results/cpu-rl.json
"""
import pytest
import torch

from pgest.benchmarks import RL_KS as KS, RL_ROWS as ROWS, compiled, rl_step_log_softmax, rl_step_pgest, rl_step_torch

# one compiled function is traced at 16 static shapes
torch._dynamo.config.recompile_limit = 64

PROVIDERS = {"pgest": rl_step_pgest, "torch_categorical": rl_step_torch, "log_softmax_gather": rl_step_log_softmax,
             "log_softmax_gather_compiled": None}


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("K", KS)
@pytest.mark.parametrize("rows", ROWS)
def test_rl_step(benchmark, rows, K, provider):
    x = torch.randn(rows, K, generator=torch.Generator().manual_seed(0)).requires_grad_()
    fn = compiled(rl_step_log_softmax) if provider == "log_softmax_gather_compiled" else PROVIDERS[provider]

    def run():
        x.grad = None
        fn(x).backward()

    run()  # compile / warm up outside the timing
    benchmark.group = f"rl step {rows}x{K} fp32"
    benchmark.extra_info.update(op="Categorical sample + log_prob + entropy fwd+bwd", shape=[rows, K],
                                dtype="fp32", provider=provider)
    benchmark.pedantic(run, rounds=15, iterations=5, warmup_rounds=2)
