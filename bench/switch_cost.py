"""What a provider's call costs right after another provider ran: the reason
bench/harness.py: interleaved_medians uses long rounds.

For every ordered pair (A, B) of the RL-matrix providers at one shape: run B
for ``--lead`` seconds, then time A's next ``--calls`` calls one by one;
repeated ``--repeats`` times, the median of each position is printed (in
microseconds). A row "A after A" is A's steady state.

    python bench/switch_cost.py --rows 64 --K 2
"""
import argparse
import statistics
import time

import torch
from harness import rl_providers


def after(fns, a, b, lead, calls, repeats):
    per_position = [[] for _ in range(calls)]
    for _ in range(repeats):
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < lead:
            fns[b]()
        for i in range(calls):
            t0 = time.perf_counter()
            fns[a]()
            per_position[i].append(time.perf_counter() - t0)
    return [statistics.median(v) * 1e6 for v in per_position]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--K", type=int, default=2)
    p.add_argument("--lead", type=float, default=2e-3, help="seconds of the other provider before timing")
    p.add_argument("--calls", type=int, default=8)
    p.add_argument("--repeats", type=int, default=150)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    x = torch.randn(args.rows, args.K, generator=torch.Generator().manual_seed(0)).requires_grad_()
    fns = rl_providers(x)
    for f in fns.values():
        for _ in range(100):
            f()
    print(f"{args.rows} x {args.K} fp32, {args.threads} threads; us per call, calls 1..{args.calls} after "
          f"{args.lead * 1e3:g} ms of the other provider (medians of {args.repeats})")
    for a in fns:
        for b in fns:
            times = after(fns, a, b, args.lead, args.calls, args.repeats)
            print(f"{a:>20} after {b:<20}" + " ".join(f"{t:6.0f}" for t in times), flush=True)


if __name__ == "__main__":
    main()
