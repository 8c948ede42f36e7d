"""Truncated sampling (top-p 0.95, top-k 50) against pgest's plain sampler,
transformers' warpers + torch.multinomial (sort-based, what generate() runs)
and the same sort-based formulation under torch.compile; the providers of a
row timed in alternation (harness.interleaved_medians).

Two kinds of logits: `flat` (randn * 3: top-p 0.95 keeps about 9% of the
vocabulary, the hard case for a selection) and `peaked` (randn * 2 with 64
tokens raised by 4 to 14, as a language model's next-token logits hold
most of their mass in a few tokens: top-p 0.95 keeps about 15).

    python bench/bench_truncation.py --out bench/results/cpu-truncation-<date>.json
    python bench/bench_truncation.py --scoring-only --out ...   # the trainer's side alone
"""
import argparse
import os

import torch
from harness import compiled, interleaved_medians, peak_allocated_bytes, write_results

import pgest

torch._inductor.config.compile_threads = 1
torch._dynamo.config.recompile_limit = 64

SHAPES = [(256, 128256), (4096, 32000)]


def logits(kind, R, K):
    g = torch.Generator().manual_seed(0)
    if kind == "flat":
        return torch.randn(R, K, generator=g) * 3
    x = torch.randn(R, K, generator=g) * 2
    idx = torch.randint(0, K, (R, 64), generator=g)
    return x.scatter_add_(1, idx, torch.rand(R, 64, generator=g) * 10 + 4)
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


def head(rounds, N=1024, H=1024, V=32000):
    """linear_sample with top-p 0.95 and top-k 50 against itself unfiltered:
    hidden randn, weight randn / sqrt(H) * 3 (logits of std about 3)."""
    rows = []
    g = torch.Generator().manual_seed(0)
    for dname, dtype in DTYPES.items():
        h = torch.randn(N, H, generator=g).to(dtype)
        w = (torch.randn(V, H, generator=g) * (3 / H ** 0.5)).to(dtype)
        gen = torch.Generator().manual_seed(1)
        fns = {"unfiltered": lambda: pgest.linear_sample(h, w, generator=gen)}
        for fname, kw in FILTERS.items():
            fns[fname] = (lambda kw: lambda: pgest.linear_sample(h, w, generator=gen, **kw))(kw)
        # blocks of token_tile x 16384 logits (64 MiB fp32) instead of x 2048: the
        # products on 524 tokens at a time instead of 65
        fns["top_p=0.95,vocab_tile=16384"] = lambda: pgest.linear_sample(h, w, generator=gen, top_p=0.95,
                                                                          vocab_tile=16384)
        med = interleaved_medians(fns, rounds=rounds, round_seconds=0.0)
        peaks = {n: peak_allocated_bytes(f) / 2**20 for n, f in fns.items()}
        rows.append({"shape": [N, H, V], "dtype": dname, "seconds": med, "peak_mib": peaks,
                     "logits_mib": N * V * 4 / 2**20})
        print(f"head {N} x {H} x {V} {dname}: unfiltered {med['unfiltered']:.3f} s"
              + "".join(f"; {n} {med[n]:.3f} s ({med[n] / med['unfiltered']:.2f}x)" for n in fns
                        if n != "unfiltered")
              + "; peaks " + ", ".join(f"{n} {v:.1f}" for n, v in peaks.items()) + " MiB", flush=True)
    return rows


def scoring(rounds):
    """The trainer's side, flat logits, actions of a truncated draw: forward
    (pgest.log_prob with top-p 0.95 recomputing the kept set, with the
    sampler's replayed cut, with top-k 50) and forward + backward (top-p),
    against pgest.log_prob without truncation and against the kept logits'
    route (the set's logits formed, then scored: the route torch.compile and
    CUDA take, and the CPU's before the kernels took kept sets); peak memory
    of forward + backward."""
    from pgest.ops.log_prob import rows_pair
    from pgest.truncation import filters, kept_logits

    def formed(x, a, **kw):
        z, _ = kept_logits(x, filters(x.shape[:-1], **kw), with_mass=False)
        return rows_pair(z, a.view(-1, 1), -100, (a.shape, x.shape[:-1]))

    def listed_formed(x, a, lists):
        z, _ = kept_logits(x, filters(x.shape[:-1], 1.0), kept_tokens=lists, with_mass=False)
        return rows_pair(z, a.view(-1, 1), -100, (a.shape, x.shape[:-1]))

    def step(score):
        lp, ent = score()
        (lp.sum() + 0.01 * ent.sum()).backward()

    rows = []
    for R, K in SHAPES:
        for dname, dtype in DTYPES.items():
            x = logits("flat", R, K).to(dtype)
            s_p = pgest.sample(x, top_p=0.95, generator=torch.Generator().manual_seed(1))
            s_k = pgest.sample(x, top_k=50, generator=torch.Generator().manual_seed(2))
            a = s_p.actions
            xg = x.clone().requires_grad_()
            fwd = {"log_prob": lambda: pgest.log_prob(x, a),
                   "top_p=0.95": lambda: pgest.log_prob(x, a, top_p=0.95),
                   "top_p=0.95 formed": lambda: formed(x, a, top_p=0.95),
                   "threshold=cut": lambda: pgest.log_prob(x, a, threshold=s_p.truncation.cut),
                   "top_k=50": lambda: pgest.log_prob(x, s_k.actions, top_k=50)}
            # the sampler's sets as an outside sampler's token lists (vLLM's mask replay)
            keep = x.float() >= s_p.truncation.threshold[:, None]
            lists = (keep.nonzero()[:, 1], torch.cat([torch.zeros(1, dtype=torch.int64), keep.sum(-1).cumsum(0)]))
            bwd = {"log_prob fwd+bwd": lambda: step(lambda: pgest.log_prob(xg, a)),
                   "top_p=0.95 fwd+bwd": lambda: step(lambda: pgest.log_prob(xg, a, top_p=0.95)),
                   "top_p=0.95 formed fwd+bwd": lambda: step(lambda: formed(xg, a, top_p=0.95)),
                   "kept_tokens fwd+bwd": lambda: step(lambda: pgest.log_prob(xg, a, kept_tokens=lists)),
                   "kept_tokens formed fwd+bwd": lambda: step(lambda: listed_formed(xg, a, lists))}
            med = interleaved_medians(fwd | bwd, rounds=rounds, round_seconds=0.0)
            peak = {n: peak_allocated_bytes(fn) for n, fn in bwd.items()}
            rows.append({"shape": [R, K], "dtype": dname, "seconds": med, "peak_bytes": peak})
            ratio = {n: med[n] / med["log_prob" + (" fwd+bwd" if "bwd" in n else "")] for n in med}
            print(f"scoring {R} x {K} {dname}: " + "; ".join(
                f"{n} {med[n] * 1e3:.1f} ms ({ratio[n]:.2f}x)" for n in med), flush=True)
            print("  peak MiB fwd+bwd: " + "; ".join(f"{n} {v / 2**20:.0f}" for n, v in peak.items()), flush=True)
    return rows


def head_scoring(rounds, N=1024, H=1024, V=32000):
    """The head's trainer: linear_log_prob forward + backward (hidden and
    weight) with top-p 0.95 against itself untruncated, and the same with
    each block's kept logits formed (the GPU's and the process groups'
    route, the CPU's before the kernels took kept sets); peak memory."""
    import importlib

    truncated = importlib.import_module("pgest.linear.truncated")
    g = torch.Generator().manual_seed(0)
    rows = []
    for dname, dtype in DTYPES.items():
        h = torch.randn(N, H, generator=g).to(dtype).requires_grad_()
        w = (torch.randn(V, H, generator=g) * (3 / H ** 0.5)).to(dtype).requires_grad_()
        a = pgest.linear_sample(h.detach(), w.detach(), top_p=0.95, generator=torch.Generator().manual_seed(1)).actions

        def step(**kw):
            lp, ent = pgest.linear_log_prob(h, w, a, **kw)
            (lp.sum() + 0.01 * ent.sum()).backward()
            h.grad = w.grad = None

        def formed():
            native = truncated._scored_natively
            truncated._scored_natively = lambda x, shard: False
            try:
                step(top_p=0.95)
            finally:
                truncated._scored_natively = native

        fns = {"untruncated": step, "top_p=0.95": lambda: step(top_p=0.95), "top_p=0.95 formed": formed}
        med = interleaved_medians(fns, rounds=rounds, round_seconds=0.0)
        peaks = {n: peak_allocated_bytes(f) / 2**20 for n, f in fns.items()}
        rows.append({"shape": [N, H, V], "dtype": dname, "seconds": med, "peak_mib": peaks})
        print(f"head trainer {N} x {H} x {V} {dname} fwd+bwd: " + "; ".join(
            f"{n} {med[n]:.3f} s ({med[n] / med['untruncated']:.2f}x, peak {peaks[n]:.0f} MiB)" for n in fns),
            flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--logits", nargs="+", default=["flat", "peaked"], choices=["flat", "peaked"])
    ap.add_argument("--compile-logits", nargs="+", default=["flat"],
                    help="the kinds the compiled sort route runs on (10 s a call at 4096 x 32000)")
    ap.add_argument("--head-only", action="store_true", help="only the fused head's rows")
    ap.add_argument("--scoring-only", action="store_true", help="only the trainer's side (pgest.log_prob)")
    ap.add_argument("--pgest-only", action="store_true",
                    help="the sampler against itself unfiltered only (no transformers, no compile, no head)")
    args = ap.parse_args(argv)
    if args.scoring_only:
        write_results(args.out, logits="flat: randn * 3", scoring=scoring(args.rounds),
                      head_scoring=head_scoring(args.rounds),
                      method=f"medians of {args.rounds} alternating rounds of one call each",
                      thp=os.environ.get("THP_MEM_ALLOC_ENABLE", "0"))
        return
    import transformers as tf

    rows = []
    head_rows = [] if args.pgest_only else head(args.rounds)
    if args.head_only:
        args.logits = []
    for kind, (R, K) in ((kind, shape) for kind in args.logits for shape in SHAPES):
        for dname, dtype in DTYPES.items():
            x = logits(kind, R, K).to(dtype)
            g = torch.Generator().manual_seed(1)
            for fname, kw in FILTERS.items():
                ws = [tf.TopPLogitsWarper(kw["top_p"])] if "top_p" in kw else [tf.TopKLogitsWarper(kw["top_k"])]
                fns = {"pgest": lambda: pgest.sample(x, generator=g, **kw),
                       "pgest_unfiltered": lambda: pgest.sample(x, generator=g)}
                if not args.pgest_only:
                    fns["transformers_warpers"] = lambda: warpers_route(ws, x)
                if not args.no_compile and not args.pgest_only and kind in args.compile_logits:
                    c = compiled(sorted_route)
                    fns["sorted_compiled"] = lambda: c(x, **kw)
                med = interleaved_medians(fns, rounds=args.rounds, round_seconds=0.0)
                kept = pgest.truncation(x, **kw).kept.double().mean().item()
                row = {"logits": kind, "shape": [R, K], "dtype": dname, "filter": fname, "mean_kept": kept,
                       "seconds": med}
                rows.append(row)
                p = med["pgest"]
                print(f"{kind} {R} x {K} {dname} {fname} (kept {kept:.0f}): pgest {p * 1e3:.1f} ms; unfiltered {p / med['pgest_unfiltered']:.2f}x"
                      + "".join(f"; {n} {med[n] / p:.1f}x slower" for n in med if n not in ("pgest", "pgest_unfiltered")),
                      flush=True)
    write_results(args.out, logits="flat: randn * 3; peaked: randn * 2, 64 tokens + U(4, 14)", rows=rows,
                  head=head_rows, method=f"medians of {args.rounds} alternating rounds of one call each")


if __name__ == "__main__":
    main()
