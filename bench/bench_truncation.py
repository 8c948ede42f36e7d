"""Truncated sampling (top-p 0.95, top-k 50) against pgest's plain sampler,
transformers' warpers + torch.multinomial (sort-based, what generate() runs)
and the same sort-based formulation under torch.compile; the providers of a
row timed in alternation (harness.interleaved_medians).

    python bench/bench_truncation.py --out bench/results/cpu-truncation-<date>.json
"""
import argparse
import json

import torch
from harness import compiled, interleaved_medians, machine_info

import pgest

torch._inductor.config.compile_threads = 1
torch._dynamo.config.recompile_limit = 64

SHAPES = [(256, 128256), (4096, 32000)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FILTERS = {"top_p=0.95": dict(top_p=0.95), "top_k=50": dict(top_k=50)}


def sorted_route(x, top_p=None, top_k=None):
    """transformers' TopK/TopP warpers written out (sort, cumsum, scatter) + multinomial."""
    scores = x.float()
    if top_k is not None:
        kth = torch.topk(scores, top_k, -1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None:
        s, i = torch.sort(scores, descending=False)
        cum = s.softmax(-1).cumsum(-1)
        remove = cum <= (1 - top_p)
        remove[..., -1:] = False
        scores = scores.masked_fill(remove.scatter(-1, i, remove), float("-inf"))
    return torch.multinomial(scores.softmax(-1), 1)


def warpers_route(warpers, x):
    scores = x.float()
    for w in warpers:
        scores = w(None, scores)
    return torch.multinomial(scores.softmax(-1), 1)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args(argv)
    import transformers as tf

    rows = []
    for (R, K) in SHAPES:
        for dname, dtype in DTYPES.items():
            x = (torch.randn(R, K, generator=torch.Generator().manual_seed(0)) * 3).to(dtype)
            g = torch.Generator().manual_seed(1)
            for fname, kw in FILTERS.items():
                ws = [tf.TopPLogitsWarper(kw["top_p"])] if "top_p" in kw else [tf.TopKLogitsWarper(kw["top_k"])]
                fns = {"pgest": lambda: pgest.sample(x, generator=g, **kw),
                       "pgest_unfiltered": lambda: pgest.sample(x, generator=g),
                       "transformers_warpers": lambda: warpers_route(ws, x)}
                if not args.no_compile:
                    c = compiled(sorted_route)
                    fns["sorted_compiled"] = lambda: c(x, **kw)
                med = interleaved_medians(fns, rounds=args.rounds, round_seconds=0.0)
                row = {"shape": [R, K], "dtype": dname, "filter": fname, "seconds": med}
                rows.append(row)
                p = med["pgest"]
                print(f"{R} x {K} {dname} {fname}: pgest {p * 1e3:.1f} ms; unfiltered {p / med['pgest_unfiltered']:.2f}x"
                      + "".join(f"; {n} {med[n] / p:.1f}x slower" for n in med if n not in ("pgest", "pgest_unfiltered")),
                      flush=True)
    info = dict(machine_info(), logits="randn * 3", rows=rows,
                method=f"medians of {args.rounds} alternating rounds of one call each")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(info, f, indent=1)


if __name__ == "__main__":
    main()
