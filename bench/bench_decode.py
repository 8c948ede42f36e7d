"""One decode step of sampling from a language-model head: what
``pgest.integrations.hf.generate`` runs per token (``pgest.linear_sample`` by
the route ``hf.decode_filters`` picks) against materialised logits +
softmax + ``torch.multinomial``, at decode shapes (1 to 256 sequences,
vocabularies of 32000 and 151936), the two alternated, medians.

    python bench/bench_decode.py --out bench/results/cpu-decode-<date>.json
"""
import argparse

import torch
from harness import interleaved_medians, write_results

import pgest
from pgest.integrations.hf import decode_filters


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args(argv)
    rows = []
    for V in (32000, 151936):
        g = torch.Generator().manual_seed(0)
        head = torch.nn.Linear(args.hidden, V, bias=False)
        with torch.no_grad():
            head.weight.copy_(torch.randn(V, args.hidden, generator=g) / args.hidden ** 0.5 * 3)
        w = head.weight.detach()
        for B in (1, 8, 64, 256):
            h = torch.randn(B, args.hidden, generator=g)
            kw = decode_filters(B, head, 1.0, None, None, None)
            gen = torch.Generator().manual_seed(1)

            def ours():
                return pgest.linear_sample(h, w, generator=gen, **kw).actions

            def theirs():
                return torch.multinomial(torch.softmax(h @ w.T, -1), 1, generator=gen)

            med = interleaved_medians({"pgest": ours, "materialised": theirs}, rounds=args.rounds, round_seconds=0.05)
            route = "blocked" if kw["top_k"] == 0 else "tiled"
            rows.append({"sequences": B, "vocab": V, "route": route, "seconds": med})
            print(f"{B} x {V} (H {args.hidden}, fp32, {route}): pgest {med['pgest'] * 1e3:.2f} ms, "
                  f"materialised {med['materialised'] * 1e3:.2f} ms ({med['materialised'] / med['pgest']:.2f}x)",
                  flush=True)
    write_results(args.out, hidden=args.hidden, rows=rows,
                  method=f"the two alternated in rounds of at least 50 ms, medians of {args.rounds} rounds")


if __name__ == "__main__":
    main()
