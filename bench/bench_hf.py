"""Per-token log-probs + entropy + backward for a tiny Qwen2 at a 152k
vocabulary: pgest.integrations.hf.token_log_probs against the route TRL's
GRPOTrainer takes by default (the model's logits, then log_softmax + gather
and the entropy from the logits, as its selective_log_softmax and
entropy_from_logits compute them). Time (the two alternated, medians) and
peak memory (each alone, torch.profiler's allocator events).

    python bench/bench_hf.py --out bench/results/cpu-hf-<date>.json
"""
import argparse
import warnings

import torch
from harness import interleaved_medians, lm_args, tiny_qwen2, write_results

from pgest.examples.memory import peak_allocated_bytes
from pgest.integrations import hf


def materialised(model, ids, keep):
    logits = model(input_ids=ids, logits_to_keep=keep + 1).logits[:, :-1]
    ls = logits.log_softmax(-1)
    lp = ls.gather(-1, ids[:, -keep:, None]).squeeze(-1)
    ent = -(ls.exp() * ls).sum(-1)
    return lp, ent


def main(argv=None):
    args = lm_args(argparse.ArgumentParser(), vocab=151936, sequences=8, completion=512).parse_args(argv)
    import transformers

    warnings.simplefilter("ignore")
    model = tiny_qwen2(args.hidden, args.vocab)
    ids = torch.randint(0, args.vocab, (args.sequences, args.prompt + args.completion))
    keep = args.completion

    def step(fn):
        def run():
            model.zero_grad(set_to_none=True)
            lp, ent = fn()
            (lp.sum() + 0.01 * ent.sum()).backward()
        return run

    ours = step(lambda: hf.token_log_probs(model, ids, logits_to_keep=keep))
    theirs = step(lambda: materialised(model, ids, keep))
    lp1, _ = hf.token_log_probs(model, ids, logits_to_keep=keep)
    lp2, _ = materialised(model, ids, keep)
    err = float((lp1 - lp2).abs().max())
    med = interleaved_medians({"pgest": ours, "materialised": theirs}, rounds=args.rounds, round_seconds=0.0)
    peaks = {"pgest": peak_allocated_bytes(ours), "materialised": peak_allocated_bytes(theirs)}
    tokens = args.sequences * keep
    print(f"Qwen2 (hidden {args.hidden}, 2 layers, vocab {args.vocab}), {args.sequences} x ({args.prompt} + {keep}) "
          f"tokens, {tokens} scored, fp32: pgest {med['pgest']:.3f} s, {peaks['pgest'] / 2**20:.0f} MiB peak; "
          f"materialised {med['materialised']:.3f} s, {peaks['materialised'] / 2**20:.0f} MiB peak; "
          f"max |log-prob difference| {err:.1e}")
    write_results(args.out, transformers=transformers.__version__, shape=vars(args), seconds=med, peak_bytes=peaks,
                  max_abs_log_prob_difference=err,
                  method=f"the two alternated, medians of {args.rounds} rounds of one step each; peaks each alone")


if __name__ == "__main__":
    main()
