"""The large-vocabulary policy of large_vocab.py with its head split by
vocabulary over the ranks of a torch.distributed group (Megatron's layout).

Launch:  torchrun --nproc-per-node 2 examples/vocab_parallel.py [--compare]

Every rank builds the same model from the seed, keeps its contiguous share of
the unembedding's rows (V / world each, the last rank the remainder), and
runs the fused-head loop: ``pgest.linear_sample`` and ``pgest.linear_log_prob``
with ``process_group``, group-normalised rewards, the clipped PPO objective.
Only O(tokens) statistics cross ranks; the hidden states' gradient is summed
over the group, so the replicated layers stay identical on every rank and
each rank's Adam step on its shard is the single process's step on those
rows. Run without torchrun, it is the same loop in one process;
``--compare`` makes rank 0 also run that single-process loop afterwards and
print both reward curves.
"""
from __future__ import annotations

import argparse
import os
import time
from typing import Dict, List, Optional

import torch

import pgest
from pgest.baselines import group_normalize
from pgest.examples.large_vocab import CHARS, VOCAB, ToyPolicy, reward
from pgest.linear.tiles import PIECE

# Shards split the vocabulary on the head's piece grid (pgest.linear.tiles.PIECE,
# as Megatron pads its vocabulary to a multiple of 128 x the parallel degree):
# the sharded run then computes the very pieces of the single process and folds
# them in the same order, so sampling and log-probs agree in every bit (the
# weights' updates may still differ in the last bits: hidden's gradient is a
# float64 all-reduce of the ranks' shares).
TILE = PIECE


def _loop(steps: int, prompts: int, length: int, group: int, lr: float, seed: int, process_group) -> Dict:
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, CHARS, (prompts, length), generator=g)
    prompt_ids = torch.arange(prompts)
    model = ToyPolicy(prompts, length, seed=seed)
    w_full, b_full = model.unembed.weight.detach(), model.unembed.bias.detach()
    if process_group is not None:
        rank, world = torch.distributed.get_rank(process_group), torch.distributed.get_world_size(process_group)
        bounds = [VOCAB * r // world // PIECE * PIECE for r in range(world)] + [VOCAB]
        rows = slice(bounds[rank], bounds[rank + 1])
    else:
        rows = slice(0, VOCAB)
    weight = torch.nn.Parameter(w_full[rows].clone())
    bias = torch.nn.Parameter(b_full[rows].clone())
    body = [model.prompt, model.position] + list(model.hidden.parameters())
    opt = torch.optim.Adam(body + [weight, bias], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    curve: List[float] = []
    t0 = time.perf_counter()
    for _ in range(steps):
        h = model.features(prompt_ids)
        s = pgest.linear_sample(h.detach(), weight.detach(), bias=bias.detach(), num_samples=group, generator=gen,
                                vocab_tile=TILE, process_group=process_group)
        r = reward(s.actions, target)
        adv = group_normalize(r)[:, None, :].expand_as(s.actions)
        lp, _ = pgest.linear_log_prob(h, weight, s.actions, bias=bias, vocab_tile=TILE, process_group=process_group)
        seq = lambda t: t.permute(0, 2, 1).reshape(-1, t.shape[1])  # noqa: E731  (B, L, G) -> (B * G, L)
        loss, _ = pgest.objectives.ppo_loss(seq(lp), seq(s.log_prob), seq(adv), clip=0.2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        curve.append(r.mean().item())
    return {"rewards": curve, "seconds": time.perf_counter() - t0}


def run(steps: int = 60, prompts: int = 16, length: int = 16, group: int = 8, lr: float = 3e-2, seed: int = 0,
        process_group=None) -> Dict:
    return _loop(steps, prompts, length, group, lr, seed, process_group)


def main(argv: Optional[list] = None) -> Dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compare", action="store_true", help="rank 0 also runs the single-process loop")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    group = None
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        torch.distributed.init_process_group("gloo")
        group = torch.distributed.group.WORLD
    rank = 0 if group is None else torch.distributed.get_rank()
    out = run(steps=args.steps, seed=args.seed, process_group=group)
    if rank == 0:
        world = 1 if group is None else torch.distributed.get_world_size()
        print(f"{world} rank(s): mean reward per step " + " ".join(f"{v:.3f}" for v in out["rewards"]))
        print(f"  {out['seconds']:.1f} s")
        if args.compare and group is not None:
            single = run(steps=args.steps, seed=args.seed, process_group=None)
            print("1 process:  mean reward per step " + " ".join(f"{v:.3f}" for v in single["rewards"]))
            same = sum(a == b for a, b in zip(out["rewards"], single["rewards"]))
            print(f"  identical rewards at {same} of {args.steps} steps; largest difference "
                  f"{max(abs(a - b) for a, b in zip(out['rewards'], single['rewards'])):.2e}")
            out["single"] = single
    if group is not None:
        torch.distributed.destroy_process_group()
    return out


if __name__ == "__main__":
    main()
