"""One pass over large rows against the read floor (the row-pass issue's table).

    python bench/bench_row_pass.py [--out bench/results/cpu-row-pass-<cpu>-<date>.json]
    python bench/bench_row_pass.py --against /tmp/base [--processes 4]


For each shape and dtype, in alternation (harness.interleaved_medians, 20 ms
rounds, medians): ``x.sum()`` (the read floor), ``x.clone()`` (read + write),
``pgest.sample`` (one draw a row), ``pgest.log_prob``'s forward (one action a
row, with the entropy) and ``pgest.reinforce_grad`` (label-match rewards, the
batch-mean baseline). Logits ``randn * 2``. Prints the ratios and the CPU's
model name; ``PGEST_CPU_ISA`` picks the kernels' instruction set.

``--against TREE`` compares this checkout with another source tree of pgest
with its extension built (``git worktree add /tmp/base <commit>``, then a
build there): the two run in alternated processes, and the medians over the
processes of each op's time and the ratio this / TREE are printed. The read
floor drifts by 2x here between minutes (other machines' memory traffic),
so a change is judged by this ratio, not by two tables taken apart.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys

if __name__ == "__main__" and "--tree" in sys.argv:  # import pgest from that tree
    sys.path.insert(0, sys.argv[sys.argv.index("--tree") + 1])

import torch  # noqa: E402
from harness import interleaved_medians  # noqa: E402

import pgest  # noqa: E402

SHAPES = [((256, 32000), torch.float32), ((64, 128256), torch.float32), ((256, 32000), torch.bfloat16),
          ((64, 128256), torch.bfloat16)]


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def row(shape, dtype, rounds: int):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) * 2).to(dtype)
    actions = torch.randint(0, shape[1], (shape[0],), generator=g)
    log_probs = torch.log_softmax(x.float(), -1).to(dtype)  # reinforce_grad's input is log-probabilities
    fns = {
        "sum": lambda: x.sum(),
        "clone": lambda: x.clone(),
        "sample": lambda: pgest.sample(x, generator=g),
        "log_prob": lambda: pgest.log_prob(x, actions),
        "reinforce_grad": lambda: pgest.reinforce_grad(log_probs, actions, baseline="mean", generator=g),
    }
    with torch.no_grad():
        t = interleaved_medians(fns, rounds=rounds)
    return {"shape": list(shape), "dtype": str(dtype).replace("torch.", ""), "seconds": t,
            "sample/sum": t["sample"] / t["sum"], "log_prob/sum": t["log_prob"] / t["sum"],
            "reinforce_grad/clone": t["reinforce_grad"] / t["clone"]}


def against(tree: str, processes: int, rounds: int):
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    trees = {"base": os.path.abspath(tree), "this": here}
    times = {}
    for _ in range(processes):
        for name, path in trees.items():
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--tree", path, "--json", "--rounds",
                                  str(rounds)], check=True, capture_output=True, text=True).stdout
            for r in json.loads(out.splitlines()[-1])["rows"]:
                for op, t in r["seconds"].items():
                    times.setdefault((tuple(r["shape"]), r["dtype"], op), {}).setdefault(name, []).append(t)
    for (shape, dtype, op), t in times.items():
        b, n = statistics.median(t["base"]), statistics.median(t["this"])
        print(f"{shape[0]} x {shape[1]} {dtype} {op}: base {b * 1e3:.3f} ms, this {n * 1e3:.3f} ms, "
              f"this / base {n / b:.3f}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--against", help="another source tree of pgest, built: compare in alternated processes")
    ap.add_argument("--processes", type=int, default=4)
    ap.add_argument("--tree", help=argparse.SUPPRESS)
    ap.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.against:
        return against(args.against, args.processes, args.rounds)
    assert args.tree is None or pgest.__file__.startswith(os.path.abspath(args.tree)), pgest.__file__
    rows = []
    for shape, dtype in SHAPES:
        r = row(shape, dtype, args.rounds)
        rows.append(r)
        if not args.json:
            print(f"{shape[0]} x {shape[1]} {r['dtype']}: sample {r['sample/sum']:.2f}x sum, "
                  f"log_prob {r['log_prob/sum']:.2f}x sum, reinforce_grad {r['reinforce_grad/clone']:.2f}x clone "
                  f"(sum {r['seconds']['sum'] * 1e3:.3f} ms, sample {r['seconds']['sample'] * 1e3:.3f} ms)",
                  flush=True)
    out = {"cpu": cpu_name(), "machine": platform.machine(), "torch": torch.__version__,
           "threads": torch.get_num_threads(), "isa": os.environ.get("PGEST_CPU_ISA", "auto"), "rows": rows,
           "method": f"interleaved_medians, {args.rounds} rounds of 20 ms; logits randn*2; log_prob forward with one "
                     "action per row (entropy included); reinforce_grad with label-match rewards, baseline='mean'"}
    if args.json:
        print(json.dumps(out))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
