"""A toy sequence policy over a 32k-token vocabulary, trained from a reward
that cannot be differentiated.

Each prompt has a hidden target string of L characters. The policy emits L
tokens per completion from a 32,000-token vocabulary; a token decodes to a
character (token id mod 64: many tokens spell the same character, as in a
real tokenizer). The reward of a completion is the fraction of characters that
match the hidden string. Several completions per prompt are sampled with
``pgest.sample``, their rewards are group-normalised
(``pgest.baselines.group_normalize``, GRPO-style) and the policy is trained
with ``pgest.policy_loss`` on (prompts, L, completions) actions.

A third loop never builds the (tokens, vocabulary) logits at all: it samples
with ``pgest.linear_sample`` straight from the hidden states and the
unembedding weight, and trains with ``pgest.linear_log_prob`` and the clipped
PPO objective of ``pgest.objectives`` (the sampler's log-probabilities as the
old ones: they equal the trainer's bit for bit, so the ratio of an on-policy
step is exactly 1).

The same loop written with plain PyTorch (log_softmax, multinomial, gather)
runs beside them, on the same model and data; tokens/s and the memory each
step holds at its peak are printed for all. Every random number is seeded (the model's
initialisation included), so ``--seed`` reproduces a run.
"""
from __future__ import annotations

import argparse
import time
from typing import Dict, Optional

import torch

import pgest
from pgest.baselines import group_normalize
from pgest.examples.memory import peak_allocated_bytes

VOCAB = 32000
CHARS = 64


class ToyPolicy(torch.nn.Module):
    """Prompt and position embeddings -> hidden -> logits over the vocabulary."""

    def __init__(self, prompts: int, length: int, dim: int = 64, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.prompt = torch.nn.Parameter(torch.randn(prompts, dim, generator=g) * 0.5)
        self.position = torch.nn.Parameter(torch.randn(length, dim, generator=g) * 0.5)
        self.hidden = torch.nn.Linear(dim, dim)
        self.unembed = torch.nn.Linear(dim, VOCAB)
        for layer in (self.hidden, self.unembed):  # nn.Linear's default init, from the seeded generator
            bound = 1.0 / dim ** 0.5
            with torch.no_grad():
                layer.weight.uniform_(-bound, bound, generator=g)
                layer.bias.uniform_(-bound, bound, generator=g)

    def features(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.hidden(self.prompt[prompt_ids][:, None, :] + self.position[None]))  # (B, L, dim)

    def forward(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        return self.unembed(self.features(prompt_ids))  # (B, L, VOCAB)


def reward(tokens: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """tokens (B, L, G), target (B, L) characters -> (B, G) fraction matched."""
    return ((tokens % CHARS) == target[:, :, None]).float().mean(1)


def step_pgest(model, opt, prompt_ids, target, group: int, gen) -> torch.Tensor:
    logits = model(prompt_ids)
    with torch.no_grad():
        actions = pgest.sample(logits, num_samples=group, generator=gen).actions  # (B, L, G)
    r = reward(actions, target)
    adv = group_normalize(r)[:, None, :].expand_as(actions)  # one advantage per completion
    loss = pgest.policy_loss(logits, actions, adv)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return r


def step_fused(model, opt, prompt_ids, target, group: int, gen) -> torch.Tensor:
    h = model.features(prompt_ids)
    w, b = model.unembed.weight, model.unembed.bias
    s = pgest.linear_sample(h.detach(), w.detach(), bias=b.detach(), num_samples=group, generator=gen)
    r = reward(s.actions, target)
    adv = group_normalize(r)[:, None, :].expand_as(s.actions)
    lp, _ = pgest.linear_log_prob(h, w, s.actions, bias=b)
    # objectives take (sequences, tokens): completion g of prompt b is one sequence
    seq = lambda t: t.permute(0, 2, 1).reshape(-1, t.shape[1])  # noqa: E731  (B, L, G) -> (B * G, L)
    loss, _ = pgest.objectives.ppo_loss(seq(lp), seq(s.log_prob), seq(adv), clip=0.2)
    step_fused.max_ratio_error = float((lp.detach() - s.log_prob).abs().max())  # 0: the same numbers
    opt.zero_grad()
    loss.backward()
    opt.step()
    return r


def step_torch(model, opt, prompt_ids, target, group: int, gen) -> torch.Tensor:
    logits = model(prompt_ids)
    B, L, V = logits.shape
    log_probs = torch.log_softmax(logits, -1)
    with torch.no_grad():
        actions = torch.multinomial(log_probs.exp().view(-1, V), group, replacement=True, generator=gen)
        actions = actions.view(B, L, group)
    r = reward(actions, target)
    adv = group_normalize(r)[:, None, :].expand_as(actions)
    loss = -(adv * log_probs.gather(-1, actions)).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    return r


def run(steps: int = 150, prompts: int = 16, length: int = 16, group: int = 8, lr: float = 3e-2,
        seed: int = 0, progress: bool = False) -> Dict:
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, CHARS, (prompts, length), generator=g)
    prompt_ids = torch.arange(prompts)
    out: Dict = {"tokens_per_step": prompts * length * group, "vocab": VOCAB}
    for name, step in [("pgest", step_pgest), ("pgest_fused", step_fused), ("torch", step_torch)]:
        model = ToyPolicy(prompts, length, seed=seed)
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        gen = torch.Generator().manual_seed(seed)
        first = last = None
        times = []
        for i in range(steps):
            t0 = time.perf_counter()
            r = step(model, opt, prompt_ids, target, group, gen)
            times.append(time.perf_counter() - t0)
            first = r.mean().item() if first is None else first
            last = r.mean().item()
            if progress and (i + 1) % 25 == 0:
                print(f"  {name}: step {i + 1}, mean reward {last:.3f}")
        times.sort()
        mem = peak_allocated_bytes(lambda: step(model, opt, prompt_ids, target, group, gen))
        out[name] = {"first_reward": first, "final_reward": last,
                     "tokens_per_s": out["tokens_per_step"] / times[len(times) // 2],
                     "step_ms": 1e3 * times[len(times) // 2], "peak_mib": mem / 2**20}
        if name == "pgest_fused":
            out[name]["sampler_trainer_logprob_gap"] = step_fused.max_ratio_error
    return out


def report(r: Dict) -> str:
    lines = [f"{r['tokens_per_step']} sampled tokens per step, vocabulary {r['vocab']}:"]
    for name in ["pgest", "pgest_fused", "torch"]:
        x = r[name]
        lines.append(f"  {name:11s} reward {x['first_reward']:.3f} -> {x['final_reward']:.3f}, "
                     f"{x['tokens_per_s']:,.0f} tokens/s ({x['step_ms']:.1f} ms/step), "
                     f"peak {x['peak_mib']:.1f} MiB allocated during a step")
    for name in ["pgest", "pgest_fused"]:
        lines.append(f"  {name}: {r[name]['tokens_per_s'] / r['torch']['tokens_per_s']:.2f}x the tokens/s, "
                     f"{r['torch']['peak_mib'] / max(r[name]['peak_mib'], 1e-9):.2f}x less peak memory")
    lines.append(f"  pgest_fused: largest |sampler log p - trainer log p| = "
                 f"{r['pgest_fused']['sampler_trainer_logprob_gap']:.1e}")
    return "\n".join(lines)


def mismatch_run(prompts: int = 7, length: int = 16, seed: int = 0, dtype: torch.dtype = torch.float32) -> Dict:
    """Generation one token per sequence per step through the fused head,
    then training's one call over the whole sequences, on the same hidden
    states (the model's part is held fixed: pgest answers for the head): the
    sampler/trainer mismatch (objectives.mismatch) of pgest, and of the same
    tokens scored the common way, logits built per step and for the whole
    batch, log_softmax, gather."""
    model = ToyPolicy(prompts, length, seed=seed).to(dtype)
    prompt_ids = torch.arange(prompts)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        h = model.features(prompt_ids)  # (B, L, dim)
        w, b = model.unembed.weight, model.unembed.bias
        steps = [pgest.linear_sample(h[:, t], w, bias=b, generator=gen) for t in range(length)]
        actions = torch.stack([s.actions for s in steps], 1)
        sampler = torch.stack([s.log_prob for s in steps], 1)
        trainer = pgest.linear_log_prob(h, w, actions, bias=b).log_prob

        def scored(x, a):
            return torch.log_softmax((x @ w.T + b).float(), -1).gather(-1, a[..., None])[..., 0]

        sampler_mat = torch.stack([scored(h[:, t], actions[:, t]) for t in range(length)], 1)
        trainer_mat = scored(h.reshape(-1, h.shape[-1]), actions.reshape(-1)).view(prompts, length)
    figures = lambda s, t: {k: float(v) for k, v in pgest.objectives.mismatch(s, t).items()}  # noqa: E731
    return {"tokens": prompts * length, "pgest": figures(sampler, trainer),
            "materialised": figures(sampler_mat, trainer_mat)}


def mismatch_report(r: Dict) -> str:
    lines = [f"{r['tokens']} tokens sampled one per sequence per step, then scored in one call:"]
    for name in ("pgest", "materialised"):
        x = r[name]
        lines.append(f"  {name:12s} identical log-probs {x['identical']:.1%}, largest |difference| "
                     f"{x['max_abs_diff']:.1e}, k3 KL {x['kl_k3']:.1e}")
    return "\n".join(lines)


def main(argv: Optional[list] = None) -> Dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mismatch", action="store_true",
                   help="sample token by token, score whole sequences: the sampler/trainer mismatch of "
                        "pgest's fused head against logits + log_softmax")
    args = p.parse_args(argv)
    if args.mismatch:
        r = mismatch_run(seed=args.seed)
        print(mismatch_report(r))
        return r
    r = run(steps=args.steps, seed=args.seed, progress=True)
    print(report(r))
    return r


if __name__ == "__main__":
    main()
