"""GRPO on a tiny language model, end to end on pgest: reverse a digit string.

A randomly initialised Qwen2-style model (transformers, built from a config,
nothing downloaded) reads a prompt of digits and a separator and must answer
with the digits reversed and an end token. Each step:

1. rollouts: ``pgest.integrations.hf.generate``, token by token with the KV
   cache and the fused sampler (temperature, top-p): no (batch, vocab) logits;
2. rewards: the fraction of answer positions right, plus a bonus for ending
   there; advantages normalised within each prompt's group (GRPO);
3. the update: ``hf.token_log_probs`` on prompt + completion (the fused head,
   replaying each token's kept set), ``objectives.ppo_loss`` with a k3 KL
   penalty to the initial model, one backward.

It prints the reward, the sampler/trainer log-prob mismatch (pgest's sampler
and trainer see the same distributions, so it stays at float rounding) and
tokens per second; ``--plot`` draws the reward curve. ``--route materialised``
runs the same loop the common way, with the model's logits on both sides:
the sampler truncated by top-p, the trainer scoring the full softmax.
"""
from __future__ import annotations

import argparse
import copy
import time
from typing import List, Optional

import torch

from pgest import objectives
from pgest.examples import require
from pgest.examples.memory import peak_allocated_bytes

DIGITS, SEP, END, PAD = 10, 10, 11, 12
VOCAB = 13


def make_model(seed: int, hidden: int = 64, layers: int = 2):
    transformers = require("transformers", "hf")
    torch.manual_seed(seed)
    config = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, tie_word_embeddings=True)
    return transformers.Qwen2ForCausalLM(config)


def prompts(n: int, length: int, g: torch.Generator) -> torch.Tensor:
    digits = torch.randint(0, DIGITS, (n, length), generator=g)
    return torch.cat([digits, torch.full((n, 1), SEP)], 1)


def rewards(prompt: torch.Tensor, completion: torch.Tensor, length: int) -> torch.Tensor:
    target = prompt[:, :length].flip(1)
    right = (completion[:, :length] == target).float().mean(1)
    ends = completion[:, length] == END if completion.shape[1] > length else torch.zeros_like(right, dtype=torch.bool)
    return right + 0.2 * ends.float()


def materialised_rollout(model, p: torch.Tensor, new_tokens: int, temperature: float, top_p: float,
                         g: torch.Generator):
    """The same rollout the common way: the model's logits each step, the
    top-p warper of transformers (a sort), softmax and torch.multinomial;
    the sampler's log-probs from the warped distribution."""
    transformers = require("transformers", "hf")
    warp = transformers.TopPLogitsWarper(top_p)
    B = p.shape[0]
    ids, lps = [], []
    done = torch.zeros(B, dtype=torch.bool)
    alive = []
    from pgest.integrations.hf import cache_argument

    name = cache_argument(model)
    cache, step_ids = None, p
    with torch.no_grad():
        for _ in range(new_tokens):
            out = model(input_ids=step_ids, use_cache=True, **{name: cache})
            cache = getattr(out, name)
            scores = warp(None, out.logits[:, -1] / temperature)
            tok = torch.multinomial(torch.softmax(scores, -1), 1, generator=g).squeeze(1)
            lp = torch.log_softmax(scores, -1).gather(1, tok[:, None]).squeeze(1)
            tok = torch.where(done, torch.full_like(tok, PAD), tok)
            alive.append(~done)
            ids.append(tok)
            lps.append(torch.where(done, torch.zeros_like(lp), lp))
            done = done | (tok == END)
            step_ids = tok[:, None]
            if bool(done.all()):
                break
    return torch.stack(ids, 1), torch.stack(alive, 1).to(torch.int64), torch.stack(lps, 1)


def materialised_log_probs(model, full: torch.Tensor, n: int, temperature: float) -> torch.Tensor:
    """The trainer the common way (TRL's default): the model's logits,
    log_softmax over the whole vocabulary, gather."""
    logits = model(input_ids=full, logits_to_keep=n + 1).logits[:, :-1] / temperature
    return torch.log_softmax(logits, -1).gather(-1, full[:, -n:, None]).squeeze(-1)


def train(steps: int = 600, length: int = 3, prompts_per_step: int = 16, group: int = 8, lr: float = 3e-3,
          beta: float = 0.01, temperature: float = 1.0, top_p: float = 0.95, seed: int = 0,
          progress: bool = True, route: str = "pgest", measure_memory: bool = True) -> dict:
    """GRPO steps; ``route`` "pgest" (the fused sampler and head) or
    "materialised" (the model's logits on both sides, the sampler truncated
    by top-p, the trainer scoring the full softmax as is common). With
    ``measure_memory`` the first step's trainer forward and backward is run
    under the allocation profiler: its peak is ``train_step_peak_bytes``."""
    from pgest.integrations import hf

    if route not in ("pgest", "materialised"):
        raise ValueError(f"route must be 'pgest' or 'materialised', got {route!r}")

    model = make_model(seed)
    reference = copy.deepcopy(model).eval()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    history: List[dict] = []
    t0 = time.perf_counter()
    tokens = 0
    peak = None
    for step in range(steps):
        p = prompts(prompts_per_step, length, g).repeat_interleave(group, 0)
        model.eval()
        if route == "pgest":
            gen = hf.generate(model, p, max_new_tokens=length + 1, temperature=temperature, top_p=top_p,
                              eos_token_id=END, pad_token_id=PAD, generator=g)
            comp, comp_mask, sampler_lp = gen.completion_ids, gen.completion_mask, gen.log_probs
        else:
            comp, comp_mask, sampler_lp = materialised_rollout(model, p, length + 1, temperature, top_p, g)
        model.train()
        r = rewards(p, comp, length)
        adv = (r.view(-1, group) - r.view(-1, group).mean(1, keepdim=True)) / (r.view(-1, group).std(1, keepdim=True)
                                                                                 + 1e-4)
        adv = adv.view(-1, 1).expand_as(comp)
        full = torch.cat([p, comp], 1)
        mask = torch.cat([torch.ones_like(p), comp_mask], 1)
        n = comp.shape[1]
        cm = comp_mask.bool()

        def learn():  # the trainer's forward and backward
            if route == "pgest":
                kw = dict(logits_to_keep=n, temperature=temperature, threshold=gen.truncation.cut)
                lp, _ = hf.token_log_probs(model, full, mask, **kw)
                with torch.no_grad():
                    ref_lp, _ = hf.token_log_probs(reference, full, mask, logits_to_keep=n, temperature=temperature)
            else:
                lp = materialised_log_probs(model, full, n, temperature)
                with torch.no_grad():
                    ref_lp = materialised_log_probs(reference, full, n, temperature)
            loss, _ = objectives.ppo_loss(lp, sampler_lp, adv, mask=cm, clip=0.2)
            kl = objectives.aggregate(objectives.kl_penalty(lp, ref_lp), cm)
            (loss + beta * kl).backward()
            return lp, kl

        if step == 0 and measure_memory:  # measured once: the profiler's replay is slow
            result = []
            peak = peak_allocated_bytes(lambda: result.append(learn()))
            lp, kl = result[0]
        else:
            lp, kl = learn()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        mismatch = objectives.mismatch(sampler_lp, lp.detach(), cm)
        tokens += int(cm.sum())
        row = {"step": step, "reward": float(r.mean()), "kl": float(kl),
               "mismatch_max": float(mismatch["max_abs_diff"]), "identical": float(mismatch["identical"]),
               "outside_band": float(mismatch["outside_band"])}
        history.append(row)
        if progress and (step % 10 == 0 or step == steps - 1):
            print(f"step {step:4d}  reward {row['reward']:.3f}  kl {row['kl']:.4f}  "
                  f"sampler/trainer max |dlogp| {row['mismatch_max']:.1e}, ratio outside [0.9, 1.1] "
                  f"{row['outside_band']:.1%}  "
                  f"{tokens / (time.perf_counter() - t0):.0f} tokens/s", flush=True)
    return {"history": history, "seconds": time.perf_counter() - t0, "tokens": tokens,
            "train_step_peak_bytes": peak}


def main(argv: Optional[List[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--length", type=int, default=3, help="digits to reverse")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plot", metavar="FILE.png", help="draw the reward curve")
    ap.add_argument("--route", choices=["pgest", "materialised"], default="pgest",
                    help="materialised: the model's logits on both sides, as is common (for comparison)")
    args = ap.parse_args(argv)
    out = train(steps=args.steps, length=args.length, seed=args.seed, route=args.route)
    h = out["history"]
    first = sum(r["reward"] for r in h[:10]) / min(10, len(h))
    last = sum(r["reward"] for r in h[-10:]) / min(10, len(h))
    outside = sum(r["outside_band"] for r in h) / len(h)
    print(f"{args.route}: mean reward: first 10 steps {first:.3f}, last 10 steps {last:.3f} (chance: "
          f"{1 / DIGITS:.3f}); {out['tokens'] / out['seconds']:.0f} completion tokens/s; sampler/trainer ratio "
          f"outside [0.9, 1.1] for {outside:.1%} of tokens on average; peak memory of a training step (the "
          f"first) {out['train_step_peak_bytes'] / 2**20:.2f} MiB")
    if args.plot:
        plt = require("matplotlib.pyplot")
        plt.plot([r["reward"] for r in h])
        plt.xlabel("step")
        plt.ylabel("mean reward")
        plt.savefig(args.plot)
        print(f"curve written to {args.plot}")
    return out


if __name__ == "__main__":
    main()
