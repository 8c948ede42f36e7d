"""Vocabulary-parallel log_prob + sample against gathering the full logits.

Launch (2 ranks on this machine, gloo):

    torchrun --standalone --nproc-per-node 2 bench/vocab_parallel_bench.py bench/results/cpu-vocab-parallel.json

A step is: sample one action per row, then log_prob + entropy forward and
backward. "pgest" passes each rank's shard with ``process_group``; "gather"
all_gathers the shards into the full (rows, V) logits on every rank and calls
the single-process ops (each rank keeps its slice of the gradient). Bytes
communicated are counted at the torch.distributed calls (what each rank hands
to the backend per step, divided by the rows); times are medians of 15 steps
(rank 0's clock, after a barrier).
"""
import json
import statistics
import sys
import time

import torch
import torch.distributed as dist

import pgest

SHAPES = [(256, 32000), (2048, 32000), (256, 128256)]


class Counter:
    """Bytes handed to all_gather / all_reduce by this rank."""

    def __init__(self):
        self.bytes = 0
        self._gather, self._reduce = dist.all_gather, dist.all_reduce

        def all_gather(out, t, *a, **k):
            self.bytes += t.numel() * t.element_size()
            return self._gather(out, t, *a, **k)

        def all_reduce(t, *a, **k):
            self.bytes += t.numel() * t.element_size()
            return self._reduce(t, *a, **k)

        dist.all_gather, dist.all_reduce = all_gather, all_reduce


def main() -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    counter = Counter()
    rows_out = []
    for R, V in SHAPES:
        g = torch.Generator().manual_seed(0)
        full = torch.randn(R, V, generator=g)
        bounds = [V * r // world for r in range(world + 1)]
        shard = full[:, bounds[rank]:bounds[rank + 1]].clone()
        gen = torch.Generator().manual_seed(1)

        def pgest_step():
            x = shard.clone().requires_grad_()
            s = pgest.sample(x.detach(), generator=gen, process_group=dist.group.WORLD)
            lp, ent = pgest.log_prob(x, s.actions, process_group=dist.group.WORLD)
            (lp.sum() + 0.01 * ent.sum()).backward()
            return x.grad

        def gather_step():
            parts = [torch.empty(R, bounds[r + 1] - bounds[r]) for r in range(world)]
            dist.all_gather(parts, shard.contiguous())
            x = torch.cat(parts, 1).requires_grad_()
            s = pgest.sample(x.detach(), generator=gen)
            lp, ent = pgest.log_prob(x, s.actions)
            (lp.sum() + 0.01 * ent.sum()).backward()
            return x.grad[:, bounds[rank]:bounds[rank + 1]]

        for name, step in [("pgest", pgest_step), ("gather", gather_step)]:
            step()
            counter.bytes = 0
            step()
            per_step = counter.bytes
            times = []
            for _ in range(15):
                dist.barrier()
                t0 = time.perf_counter()
                step()
                dist.barrier()
                times.append(time.perf_counter() - t0)
            rows_out.append({"provider": name, "rows": R, "vocab": V, "world": world,
                             "bytes_per_token": per_step / R, "ms": 1e3 * statistics.median(times)})
    if rank == 0:
        print("| rows x V | provider | bytes sent per token (per rank) | ms per step |")
        print("|---|---|---|---|")
        for r in rows_out:
            print(f"| {r['rows']} x {r['vocab']} | {r['provider']} | {r['bytes_per_token']:.0f} | {r['ms']:.2f} |")
        if len(sys.argv) > 1:
            with open(sys.argv[1], "w") as f:
                json.dump({"torch": torch.__version__, "backend": "gloo", "threads_per_rank": 1, "rows": rows_out},
                          f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
