"""TRL's fused LM head against pgest's under TRL's own contract: the
per-token log-probs + entropy + backward that GRPOTrainer runs each step,
``model(..., labels=labels, fused_lm_head=True)`` on a tiny Qwen2, with the
model patched by ``trl.trainer.utils.add_fused_lm_head`` (TRL 1.16's chunked
head; on the CPU its PyTorch route) or by
``pgest.integrations.trl.add_fused_lm_head``. Time (the two alternated,
medians) and peak memory (each alone, torch.profiler's allocator events).

    python bench/bench_trl.py --out bench/results/cpu-trl-<date>.json
"""
import argparse
import copy
import warnings

import torch
from harness import interleaved_medians, lm_args, tiny_qwen2, write_results

from pgest.examples.memory import peak_allocated_bytes
from pgest.integrations import trl as ptrl


def main(argv=None):
    args = lm_args(argparse.ArgumentParser(), vocab=32000, sequences=8, completion=256).parse_args(argv)
    import transformers
    import trl
    from trl.trainer.utils import add_fused_lm_head

    warnings.simplefilter("ignore")
    theirs_model = tiny_qwen2(args.hidden, args.vocab)
    ours_model = copy.deepcopy(theirs_model)
    add_fused_lm_head(theirs_model, outputs=("log_probs", "entropy"))
    ptrl.add_fused_lm_head(ours_model, outputs=("log_probs", "entropy"))
    ids = torch.randint(0, args.vocab, (args.sequences, args.prompt + args.completion))
    mask = torch.ones_like(ids)
    labels = ids.clone()
    labels[:, :args.prompt] = -100  # GRPOTrainer scores the completion only

    def step(model):
        def run():
            model.zero_grad(set_to_none=True)
            out = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
            (out.log_probs.sum() + 0.01 * out.entropy.sum()).backward()
        return run

    ours, theirs = step(ours_model), step(theirs_model)
    with torch.no_grad():
        a = ours_model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True).log_probs
        b = theirs_model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True).log_probs
    err = float((a - b).abs().max())
    med = interleaved_medians({"pgest": ours, "trl": theirs}, rounds=args.rounds, round_seconds=0.0)
    peaks = {"pgest": peak_allocated_bytes(ours), "trl": peak_allocated_bytes(theirs)}
    tokens = args.sequences * args.completion
    print(f"Qwen2 (hidden {args.hidden}, 2 layers, vocab {args.vocab}), {args.sequences} x ({args.prompt} + "
          f"{args.completion}) tokens, {tokens} scored, fp32, TRL {trl.__version__}: pgest {med['pgest']:.3f} s, "
          f"{peaks['pgest'] / 2**20:.0f} MiB peak; TRL's head {med['trl']:.3f} s, {peaks['trl'] / 2**20:.0f} MiB "
          f"peak; max |log-prob difference| {err:.1e}")
    write_results(args.out, trl=trl.__version__, transformers=transformers.__version__, shape=vars(args),
                  seconds=med, peak_bytes=peaks, max_abs_log_prob_difference=err,
                  method=f"the two alternated, medians of {args.rounds} rounds of one step each; peaks each alone")


if __name__ == "__main__":
    main()
