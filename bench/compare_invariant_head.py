"""The batch-invariant fused head against the head before it (commit
c3ada7a: products on whatever rows a tile has, statistics per vocabulary
tile, the chosen logits as one (S, H) product per token), in one process,
the two alternated per round by patching head.py's globals back to the
earlier functions (copied below). Medians of the rounds.

    python bench/compare_invariant_head.py TOKENS,H,V fp32|bf16 [rounds]

At the default tiles (the earlier head's vocabulary tile of 2048 is the new
piece: larger tiles would need its earlier gradient scratch too).
"""
import statistics
import sys
import time

import torch

import pgest
from pgest import _checks
from pgest.linear import head, tiles

new = dict(_vocab_tiles=head._vocab_tiles, chosen_logits=head.chosen_logits, mm_rows=head.mm_rows,
           logits_tile=head.logits_tile)


def old_products(h, w, out=None):
    if w.dtype not in tiles.HALF:
        return h @ w.T if out is None else torch.mm(h, w.T, out=out)
    hf = h.float()
    if out is None and w.shape[0] <= tiles.F32_ROWS:
        return hf @ w.float().T
    if out is None:
        out = torch.empty((h.shape[0], w.shape[0]), dtype=torch.float32, device=h.device)
    for c0 in range(0, w.shape[0], tiles.F32_ROWS):
        out[:, c0:c0 + tiles.F32_ROWS] = hf @ w[c0:c0 + tiles.F32_ROWS].float().T
    return out


def old_logits_tile(h, weight, bias, v0, v1, temperature, out=None):
    x = old_products(h, weight[v0:v1], out)
    if bias is not None:
        x += bias[v0:v1]
    if temperature != 1.0:
        x /= temperature
    return x


def old_vocab_tiles(h, weight, bias, temperature, tv, full=None):
    V = weight.shape[0]
    if full is None and h.dtype in tiles.HALF:
        h = h.float()
    for v0 in range(0, V, tv):
        v1 = min(V, v0 + tv)
        yield v0, v1, full[:, v0:v1] if full is not None else old_logits_tile(h, weight, bias, v0, v1, temperature)


def old_chosen(h2, weight, bias, actions, temperature, tn, keep=None, shard=None):
    if keep is not None:
        x = old_chosen(h2, weight, bias, torch.where(keep, actions, torch.zeros_like(actions)), temperature, tn)
        return torch.where(keep, x, torch.zeros((), dtype=x.dtype))
    N, S = actions.shape
    out = torch.empty((N, S), dtype=_checks.stats_dtype(h2.dtype))
    for n0 in range(0, N, tn):
        n1 = min(N, n0 + tn)
        a = actions[n0:n1]
        wa, hn = weight[a], h2[n0:n1].unsqueeze(-1)
        if h2.dtype in tiles.HALF:
            wa, hn = wa.float(), hn.float()
        x = torch.bmm(wa, hn).squeeze(-1)
        if bias is not None:
            x += bias[a]
        if temperature != 1.0:
            x /= temperature
        out[n0:n1] = x
    return out


old = dict(_vocab_tiles=old_vocab_tiles, chosen_logits=old_chosen, mm_rows=lambda a, b: a @ b,
           logits_tile=old_logits_tile)


def use(d):
    for k, v in d.items():
        setattr(head, k, v)


N, H, V = map(int, sys.argv[1].split(","))
dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[sys.argv[2]]
tv = None
g = torch.Generator().manual_seed(0)
hidden = torch.randn(N, H, generator=g).to(dtype).requires_grad_()
weight = (torch.randn(V, H, generator=g) / H ** 0.5).to(dtype).requires_grad_()
actions = torch.randint(0, V, (N,), generator=g)
adv = torch.randn(N, generator=g)


def step_lp():
    lp, ent = pgest.linear_log_prob(hidden, weight, actions, vocab_tile=tv)
    (-(adv * lp).mean() - 0.01 * ent.mean()).backward()


def step_fused():
    pgest.linear_policy_loss(hidden, weight, actions, adv, entropy_weight=0.01, vocab_tile=tv).backward()


def step_sample():
    pgest.linear_sample(hidden.detach(), weight.detach(), vocab_tile=tv)


for name, fn in (("linear_log_prob fwd+bwd", step_lp), ("linear_policy_loss", step_fused), ("linear_sample", step_sample)):
    ts = {"old": [], "new": []}
    for r in range(int(sys.argv[3]) if len(sys.argv) > 3 else 5):
        for k, d in (("old", old), ("new", new)):
            use(d)
            t = time.perf_counter()
            fn()
            ts[k].append(time.perf_counter() - t)
    use(new)
    mo, mn = statistics.median(ts["old"]), statistics.median(ts["new"])
    print(f"{N}x{H}x{V} {sys.argv[2]} {name}: old {mo:.3f} s, new {mn:.3f} s, new/old {mn/mo:.3f}", flush=True)
