"""python -m pgest: what this build contains, and a short comparison with the
seed's listing (same shapes as the benchmarks, fp32, medians of a few runs)."""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import pgest
from pgest.reference import seed_step

SHAPES = [(4096, 10), (1024, 1000), (256, 32000), (64, 128000)]


def _median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def compare(repeats: int = 7) -> None:
    print(f"{'shape (B, K)':>16} {'pgest':>10} {'seed':>10} {'speed-up':>9}  same gradient formula")
    for B, K in SHAPES:
        g = torch.Generator().manual_seed(0)
        log_probs = torch.randn(B, K, generator=g).log_softmax(-1)
        labels = torch.randint(0, K, (B,), generator=g)
        baseline = torch.rand(B, generator=g)
        ours = _median_ms(lambda: pgest.reinforce_grad(log_probs, labels, baseline=baseline), repeats)
        seed = _median_ms(lambda: seed_step(log_probs, labels, baseline), repeats)
        out = pgest.reinforce_grad(log_probs, labels, baseline=baseline)
        expected = ((baseline - out.rewards) / B)[:, None] * torch.nn.functional.one_hot(out.actions, K)
        same = torch.allclose(out.grad, expected, rtol=1e-6, atol=0)
        print(f"{B:>7} x {K:<7} {ours:>8.3f}ms {seed:>8.2f}ms {seed / ours:>8.1f}x  {'yes' if same else 'NO'}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pgest", description=__doc__)
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per shape (median is shown)")
    args = parser.parse_args(argv)
    info = pgest.build_info()
    print(f"pgest {info['version']} (torch {info['torch']}, CPU kernels: {info['cpu_isa']}, "
          f"{info['threads']} threads, CUDA kernels: {'yes' if info['cuda_compiled'] else 'no'})")
    print("reinforce_grad vs the seed's listing (multinomial + one_hot), fp32:")
    compare(args.repeats)


if __name__ == "__main__":
    main()
