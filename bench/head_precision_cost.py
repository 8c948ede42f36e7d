"""Cost of keeping the fused head's logits in float32 for 16-bit inputs:
linear_log_prob (forward, forward + backward), linear_policy_loss and
linear_sample at (1024 tokens, H 1024, V 32000) bf16, medians of 3 calls.
Run it alternately on two checkouts to compare them on a drifting machine:

    for r in 1 2 3; do PYTHONPATH=/path/to/older/tree python bench/head_precision_cost.py; \
                       python bench/head_precision_cost.py; done
"""
import json
import statistics
import time

import torch

import pgest

torch.manual_seed(0)
N, H, V = 1024, 1024, 32000
dtype = torch.bfloat16
hidden = torch.randn(N, H).to(dtype).requires_grad_()
weight = (torch.randn(V, H) * 4 / H ** 0.5).to(dtype).requires_grad_()
actions = torch.randint(0, V, (N,))
adv = torch.randn(N)
def fwd():
    with torch.no_grad():
        pgest.linear_log_prob(hidden, weight, actions)
def fwdbwd():
    lp, ent = pgest.linear_log_prob(hidden, weight, actions)
    (lp.sum() + ent.sum()).backward()
def fused():
    pgest.linear_policy_loss(hidden, weight, actions, adv, entropy_weight=0.01).backward()
def sample():
    pgest.linear_sample(hidden, weight, generator=torch.Generator().manual_seed(1))
out = {}
for name, f in [("linear_log_prob fwd", fwd), ("linear_log_prob fwd+bwd", fwdbwd), ("linear_policy_loss fwd+bwd", fused), ("linear_sample", sample)]:
    f()
    ts = []
    for _ in range(3):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    out[name] = statistics.median(ts)
print(json.dumps(out))
