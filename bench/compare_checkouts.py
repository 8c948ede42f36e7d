"""The fused head's training step (linear_log_prob forward + backward of a
REINFORCE loss) from two source trees of pgest, each in its own process,
the two alternated, so that a change to the head's Python is measured
against the code before it (a worktree of the earlier commit with the same
built extension: `git worktree add /tmp/base <commit>` and copy
pgest/_C*.so into it).

    python bench/compare_checkouts.py /tmp/base . TOKENS,H,V fp32|bf16 [--top-p P] [--rounds 3] [--steps 3]

Each process times `steps` steps after one warm-up and reports their
median; the script prints each process's figure and the medians over the
rounds, and the ratio of the second tree's to the first's.
"""
import argparse
import os
import statistics
import subprocess
import sys

STEP = r"""
import sys, time, statistics, torch
sys.path.insert(0, sys.argv[1])
import pgest
assert pgest.__file__.startswith(sys.argv[1]), pgest.__file__
torch.set_num_threads(2)
N, H, V = (int(v) for v in sys.argv[2].split(","))
dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[sys.argv[3]]
top_p, steps = float(sys.argv[4]), int(sys.argv[5])
g = torch.Generator().manual_seed(0)
h = torch.randn(N, H, generator=g).to(dtype).requires_grad_()
w = (torch.randn(V, H, generator=g) / H ** 0.5).to(dtype).requires_grad_()
adv = torch.randn(N, generator=g)
kw = {} if top_p >= 1.0 else dict(top_p=top_p)
a = pgest.linear_sample(h.detach(), w.detach(), generator=torch.Generator().manual_seed(1), **kw).actions
ts = []
for i in range(steps + 1):
    t0 = time.perf_counter()
    lp, ent = pgest.linear_log_prob(h, w, a, **kw)
    (-(adv * lp).mean() - 0.01 * ent.mean()).backward()
    ts.append(time.perf_counter() - t0)
    h.grad = w.grad = None
print(statistics.median(ts[1:]))
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("first")
    ap.add_argument("second")
    ap.add_argument("shape")
    ap.add_argument("dtype", choices=["fp32", "bf16"])
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    trees = [os.path.abspath(args.first), os.path.abspath(args.second)]
    times = {t: [] for t in trees}
    for _ in range(args.rounds):
        for t in trees:
            out = subprocess.run([sys.executable, "-c", STEP, t, args.shape, args.dtype, str(args.top_p),
                                  str(args.steps)], check=True, capture_output=True, text=True, cwd="/")
            times[t].append(float(out.stdout.strip().splitlines()[-1]))
            print(f"{t}: {times[t][-1]:.3f} s", flush=True)
    med = [statistics.median(times[t]) for t in trees]
    print(f"{args.shape} {args.dtype} top_p={args.top_p}: first {med[0]:.3f} s, second {med[1]:.3f} s, "
          f"second/first {med[1] / med[0]:.3f}")


if __name__ == "__main__":
    main()
