"""The fused linear head, forward + backward with a REINFORCE objective
(-mean(adv * log p) - 0.01 mean(H)): pgest.linear_log_prob followed by the
formula ("pgest", four products) and pgest.linear_policy_loss
("pgest_fused", the gradients in the forward: three products), against the materialised formula in
eager PyTorch and under torch.compile, torch's chunked
F.linear_cross_entropy (like for like: pgest with advantages 1 and no
entropy), and the matmul floor (the four products a step needs: logits for
the forward, again for the backward, grad_hidden and grad_weight). Time and
peak additional memory (torch.profiler allocation records, replayed) are
recorded for each.

    pytest bench/bench_linear_head.py --benchmark-json bench/results/cpu-linear.json
    PGEST_LINEAR_SHAPES="1024,512,32000" pytest bench/bench_linear_head.py   # other (tokens, H, V)
    PGEST_LINEAR_INTERLEAVED=3 PGEST_LINEAR_PROVIDERS=pgest_fused,compiled pytest bench/bench_linear_head.py \
        -k interleaved   # the providers of a shape in alternation, 3 rounds (ratios on a drifting machine)
"""
import os

import pytest
import torch
import torch.nn.functional as F
from harness import compiled, interleaved_medians, peak_allocated_bytes

import pgest

SHAPES = [tuple(int(v) for v in s.split(",")) for s in
          os.environ.get("PGEST_LINEAR_SHAPES", "4096,1024,128256;8192,2048,32000").split(";")]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
ROUNDS = int(os.environ.get("PGEST_LINEAR_ROUNDS", "3"))
# Subsets for a shorter run (a step takes 10-40 s here, and the peak
# measurement replays the profiler's memory timeline: minutes at these shapes)
ONLY = [p for p in os.environ.get("PGEST_LINEAR_PROVIDERS", "").split(",") if p]
PEAK = os.environ.get("PGEST_LINEAR_PEAK")  # comma-separated providers whose peak is measured (default: all)


def make(N, H, V, dtype):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, H, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g) / H ** 0.5).to(dtype).requires_grad_()
    actions = torch.randint(0, V, (N,), generator=g)
    adv = torch.randn(N, generator=g)
    return hidden, weight, actions, adv


def pgest_pg(h, w, a, adv):
    lp, ent = pgest.linear_log_prob(h, w, a)
    return -(adv * lp).mean() - 0.01 * ent.mean()


def eager_pg(h, w, a, adv):
    ls = (h @ w.T).float().log_softmax(-1)
    lp = ls.gather(-1, a[:, None]).squeeze(-1)
    ent = -(ls.exp() * ls).sum(-1)
    return -(adv * lp).mean() - 0.01 * ent.mean()


def pgest_fused(h, w, a, adv):
    # the same loss, gradients computed in the forward (three products)
    return pgest.linear_policy_loss(h, w, a, adv, entropy_weight=0.01)


def pgest_fused_ce(h, w, a, adv):
    return pgest.linear_policy_loss(h, w, a, torch.ones_like(adv))


def pgest_ce(h, w, a, adv):
    return -pgest.linear_log_prob(h, w, a).log_prob.mean()


def torch_lce(h, w, a, adv):
    return F.linear_cross_entropy(h, w, a, options=torch.nn.LinearCrossEntropyOptions())


PROVIDERS = {"pgest": pgest_pg, "pgest_fused": pgest_fused, "eager": eager_pg, "compiled": None,
             "pgest_ce": pgest_ce, "pgest_fused_ce": pgest_fused_ce, "linear_cross_entropy": torch_lce,
             "matmul_floor": None}


def floor_step(h, w):
    hd, wd = h.detach(), w.detach()
    def run():
        logits = hd @ wd.T
        del logits
        g = hd @ wd.T  # the backward's recomputation, standing in for d logits
        hd_grad = g @ wd
        wd_grad = g.T @ hd
        del g, hd_grad, wd_grad
    return run


INTERLEAVED = int(os.environ.get("PGEST_LINEAR_INTERLEAVED", "0"))


def step(provider, hidden, weight, actions, adv):
    if provider == "matmul_floor":
        return floor_step(hidden, weight)
    fn = compiled(eager_pg) if provider == "compiled" else PROVIDERS[provider]

    def run():
        hidden.grad = weight.grad = None
        fn(hidden, weight, actions, adv).backward()
    return run


@pytest.mark.skipif(not INTERLEAVED, reason="set PGEST_LINEAR_INTERLEAVED=<rounds>")
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_linear_head_interleaved(benchmark, shape, dtype):
    # A step here takes 10-40 s and this machine's speed drifts by more than
    # the gaps between providers over the minutes a sequential run takes:
    # one call of each provider per round, in a fresh random order
    # (bench/harness.py: interleaved_medians); only time is measured.
    hidden, weight, actions, adv = make(*shape, DTYPES[dtype])
    fns = {p: step(p, hidden, weight, actions, adv) for p in PROVIDERS if not ONLY or p in ONLY}
    medians = interleaved_medians(fns, rounds=INTERLEAVED, round_seconds=0.0)
    N, H, V = shape
    benchmark.group = f"linear head {N}x{H}x{V} {dtype} interleaved"
    benchmark.extra_info.update(op="linear_log_prob fwd+bwd", shape=list(shape), dtype=dtype,
                                interleaved_seconds=medians, rounds=INTERLEAVED, threads=torch.get_num_threads())
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)


@pytest.mark.parametrize("provider", [p for p in PROVIDERS if not ONLY or p in ONLY])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_linear_head_fwd_bwd(benchmark, shape, dtype, provider):
    hidden, weight, actions, adv = make(*shape, DTYPES[dtype])
    run = step(provider, hidden, weight, actions, adv)
    run()  # compile / warm up outside the timing
    N, H, V = shape
    inputs_and_grads = 2 * (hidden.numel() + weight.numel()) * hidden.element_size()
    peak = peak_allocated_bytes(run) if PEAK is None or provider in PEAK.split(",") else None
    benchmark.group = f"linear head {N}x{H}x{V} {dtype}"
    benchmark.extra_info.update(op="linear_log_prob fwd+bwd", shape=list(shape), dtype=dtype, provider=provider,
                                peak_bytes=peak, logits_bytes=N * V * hidden.element_size(),
                                grads_bytes=inputs_and_grads // 2)
    benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=0)
