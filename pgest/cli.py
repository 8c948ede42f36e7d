"""The pgest command (also ``python -m pgest``).

    pgest info                      what this build contains and what it runs on
    pgest demo [--steps N] [--plot FILE.png]
                                    guess-the-label training: policy gradient through
                                    pgest vs cross entropy, and pgest's step vs the reference recipe's
    pgest bench [--quick] [--json FILE] [--plot FILE.png]
                                    the microbenchmarks as a table
    pgest compare                   reinforce_grad vs the reference recipe, four shapes
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import statistics
import sys
import time
from typing import List, Optional

import torch

import pgest


def info(_args) -> None:
    i = pgest.build_info()
    print(f"pgest {i['version']}")
    print(f"torch {i['torch']}")
    print(f"CPU kernels: {', '.join(i['cpu_isas_compiled'])} compiled; running {i['cpu_isa']} "
          f"({'OpenMP' if i['openmp'] else 'no OpenMP'}, {i['threads']} threads; compiler {i['compiler']})")
    if i["cuda_compiled"]:
        if torch.cuda.is_available():
            runs = "they run in this process"
        elif torch.version.cuda is None:
            runs = f"they cannot run in this process: torch {torch.__version__} is a CPU build"
        else:
            runs = "they cannot run in this process: no GPU is visible"
        print(f"CUDA kernels: compiled for {', '.join(i['cuda_archs'])} (CUDA {i['cuda_version']}); {runs}")
    else:
        print("CUDA kernels: not compiled")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    names = [torch.cuda.get_device_name(d) for d in range(gpus)]
    print("devices: cpu" + "".join(f", cuda:{d} ({n})" for d, n in enumerate(names)))


def demo(args) -> None:
    from pgest.examples import guess_the_label

    argv = ["--steps", str(args.steps)] + (["--plot", args.plot] if args.plot else [])
    guess_the_label.main(argv)


def find_harness(env: Optional[str] = None, cwd: Optional[pathlib.Path] = None):
    """Load bench/harness.py, the benchmarks' providers and runner. It is
    development tooling, not part of the installed package, so it is looked
    for in $PGEST_BENCH_DIR, then in ./bench (a checkout's root), then beside
    the package (an editable install)."""
    env = os.environ.get("PGEST_BENCH_DIR") if env is None else env
    cwd = pathlib.Path.cwd() if cwd is None else cwd
    beside_package = pathlib.Path(pgest.__file__).parents[1] / "bench"
    candidates = ([pathlib.Path(env)] if env else []) + [cwd / "bench", beside_package]
    for d in candidates:
        f = d / "harness.py"
        if f.is_file():
            spec = importlib.util.spec_from_file_location("harness", f)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
    where = ", ".join(str(d) for d in candidates)
    raise SystemExit(f"pgest bench: the benchmarks live in the repository's bench/ folder, not in the installed "
                     f"package, and no bench/harness.py was found (looked in {where}). Run `pgest bench` from the "
                     f"root of a pgest checkout, or set PGEST_BENCH_DIR to its bench/ folder.")


def bench(args) -> None:
    benchmarks = find_harness()
    if args.plot:  # before minutes of measuring, not after
        from pgest.examples import require

        require("matplotlib.pyplot")
    say = (lambda m: print(f"  {m}", file=sys.stderr, flush=True)) if args.verbose else None
    rows = benchmarks.run(quick=args.quick, with_compiled=False if args.no_compile else None, progress=say)
    print(f"pgest {pgest.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"medians of {5 if args.quick else 15} rounds, the providers of a row timed in alternation"
          + ("; quick: no torch.compile" if args.quick else ""))
    print()
    print(benchmarks.table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"pgest": pgest.__version__, "torch": torch.__version__,
                       "threads": torch.get_num_threads(), "rows": rows}, f, indent=1)
        print(f"\nresults written to {args.json}")
    if args.plot:
        benchmarks.plot(rows, args.plot)
        print(f"chart written to {args.plot}")


def compare(args) -> None:
    from pgest.reference import recipe_step

    def median_ms(fn):
        fn()
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e3

    print("reinforce_grad vs the reference recipe (multinomial + one_hot), fp32, medians:")
    print(f"{'shape (B, K)':>16} {'pgest':>10} {'seed':>10} {'speed-up':>9}  same gradient formula")
    for B, K in [(4096, 10), (1024, 1000), (256, 32000), (64, 128000)]:
        g = torch.Generator().manual_seed(0)
        log_probs = torch.randn(B, K, generator=g).log_softmax(-1)
        labels = torch.randint(0, K, (B,), generator=g)
        baseline = torch.rand(B, generator=g)
        ours = median_ms(lambda: pgest.reinforce_grad(log_probs, labels, baseline=baseline))
        seed = median_ms(lambda: recipe_step(log_probs, labels, baseline))
        out = pgest.reinforce_grad(log_probs, labels, baseline=baseline)
        expected = ((baseline - out.rewards) / B)[:, None] * torch.nn.functional.one_hot(out.actions, K)
        same = torch.allclose(out.grad, expected, rtol=1e-6, atol=0)
        print(f"{B:>7} x {K:<7} {ours:>8.3f}ms {seed:>8.2f}ms {seed / ours:>8.1f}x  {'yes' if same else 'NO'}")


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="pgest", description="Fused policy-gradient estimators for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="what this build contains and what it runs on").set_defaults(fn=info)
    p = sub.add_parser("demo", help="guess-the-label training with pgest vs cross entropy (about 15 s on 2 cores)")
    p.add_argument("--steps", type=int, default=3000, help="training steps of 256 examples (default 3000)")
    p.add_argument("--plot", metavar="FILE.png", help="write the learning curves to this file")
    p.set_defaults(fn=demo)
    p = sub.add_parser("bench", help="the microbenchmarks as a table (run from a checkout: they live in bench/)")
    p.add_argument("--quick", action="store_true", help="two small shapes, fp32, no torch.compile (seconds)")
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile provider")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="also draw a bar chart")
    p.add_argument("-v", "--verbose", action="store_true", help="say what is being measured")
    p.set_defaults(fn=bench)
    p = sub.add_parser("compare", help="reinforce_grad vs the reference recipe on four shapes")
    p.add_argument("--repeats", type=int, default=7)
    p.set_defaults(fn=compare)
    args = parser.parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    main()
