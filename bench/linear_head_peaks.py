"""Peak additional memory of one forward + backward step of each provider of
bench_linear_head.py (the same steps), alone: the peak of bytes allocated
during the step (torch.profiler's raw allocator events) minus the hidden and
weight gradients the step returns. Time is not measured here.

    PYTHONPATH=. python bench/linear_head_peaks.py pgest,pgest_fused out.json
"""
import json
import sys

import torch
from bench_linear_head import DTYPES, PROVIDERS, SHAPES, eager_pg, make
from harness import compiled, peak_allocated_bytes


def main() -> None:
    providers = sys.argv[1].split(",")
    out = []
    for shape in SHAPES:
        for dtype in DTYPES:
            for provider in providers:
                hidden, weight, actions, adv = make(*shape, DTYPES[dtype])
                fn = compiled(eager_pg) if provider == "compiled" else PROVIDERS[provider]

                def run(hidden=hidden, weight=weight, actions=actions, adv=adv, fn=fn):
                    hidden.grad = weight.grad = None
                    fn(hidden, weight, actions, adv).backward()

                run()  # warm-up: compilation, first-call allocations of the matmul library
                hidden.grad = weight.grad = None
                peak = peak_allocated_bytes(run)
                grads = (hidden.numel() + weight.numel()) * hidden.element_size()
                N, H, V = shape
                row = dict(shape=list(shape), dtype=dtype, provider=provider, peak_bytes=peak, grads_bytes=grads,
                           extra_mib=(peak - grads) / 2**20, logits_mib=N * V * hidden.element_size() / 2**20)
                print(row, flush=True)
                out.append(row)
                del hidden, weight
    with open(sys.argv[2], "w") as f:
        json.dump({"machine": "cpu", "torch": torch.__version__, "threads": torch.get_num_threads(),
                   "peaks": out}, f, indent=1)


if __name__ == "__main__":
    main()
