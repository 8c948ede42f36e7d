"""Large shapes with and without torch's transparent-huge-page allocator.

A fresh large output pays a 4 KiB page fault per page on first touch; torch's
CPU allocator can ask for 2 MiB pages instead (THP_MEM_ALLOC_ENABLE=1). This
runs the large-shape rows of `pgest bench` (no torch.compile) in two child
processes, one per setting, and writes both to one JSON file:

    python bench/thp_compare.py bench/results/cpu-thp.json
"""
import json
import os
import subprocess
import sys

SHAPES = [(256, 32000), (64, 128000), (4096, 32000)]


def measure() -> list:
    import torch
    from harness import eager_policy_loss, median_seconds, train_step

    import pgest
    from pgest.reference import recipe_step

    rows = []
    for B, K in SHAPES:
        g = torch.Generator().manual_seed(0)
        logits = torch.randn(B, K, generator=g)
        labels = torch.randint(0, K, (B,), generator=g)
        baseline, adv = torch.rand(B, generator=g), torch.randn(B, generator=g)
        log_probs = logits.log_softmax(-1)
        x = logits.clone().requires_grad_()
        cases = {
            ("reinforce_grad", "pgest"): lambda: pgest.reinforce_grad(log_probs, labels, baseline=baseline),
            ("reinforce_grad", "recipe"): lambda: recipe_step(log_probs, labels, baseline),
            ("policy_loss fwd+bwd", "pgest"): train_step(lambda a, b, c: pgest.policy_loss(a, b, c), x, labels, adv),
            ("policy_loss fwd+bwd", "eager"): train_step(eager_policy_loss, x, labels, adv),
            ("copy", "clone"): lambda: logits.clone(),
        }
        for (op, provider), fn in cases.items():
            if op == "reinforce_grad" and provider == "recipe" and B * K > 8_000_000:
                continue  # the reference recipe at 4096 x 32000 takes seconds a call
            rows.append({"op": op, "provider": provider, "shape": [B, K], "dtype": "fp32",
                         "seconds": median_seconds(fn, repeats=9)})
    return rows


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(measure()))
        return
    out = sys.argv[1] if len(sys.argv) > 1 else "thp.json"
    result = {}
    for setting in ("0", "1"):
        env = dict(os.environ, THP_MEM_ALLOC_ENABLE=setting)
        done = subprocess.run([sys.executable, __file__, "--child"], env=env, capture_output=True, text=True,
                              check=True)
        result[f"THP_MEM_ALLOC_ENABLE={setting}"] = json.loads(done.stdout.strip().splitlines()[-1])
    import torch

    result["torch"] = torch.__version__
    result["threads"] = torch.get_num_threads()
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    off, on = result["THP_MEM_ALLOC_ENABLE=0"], result["THP_MEM_ALLOC_ENABLE=1"]
    print("| op | provider | shape | ms, default | ms, THP_MEM_ALLOC_ENABLE=1 |")
    print("|---|---|---|---|---|")
    for a, b in zip(off, on):
        print(f"| {a['op']} | {a['provider']} | {a['shape'][0]} x {a['shape'][1]} | {a['seconds'] * 1e3:.1f} | "
              f"{b['seconds'] * 1e3:.1f} |")


if __name__ == "__main__":
    main()
