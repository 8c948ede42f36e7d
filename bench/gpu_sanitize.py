"""Every CUDA op on the shapes that stress its schedule, for compute-sanitizer
(bench/gpu_run.sh runs it under memcheck, racecheck and synccheck):

    compute-sanitizer --tool memcheck --error-exitcode 1 python bench/gpu_sanitize.py [--small]
    python bench/gpu_sanitize.py --small --device cpu    # its dry run, no GPU

K = 1, K not a multiple of the 2048-entry tile, K = 262144 (longer tiles),
more rows than a grid dimension, S > 1 and S above the pairwise limit (the
backward's scratch), ignore_index, transposed logits, and refused rows (NaN,
all -inf, actions and labels out of range) in both error modes. ``--small``
keeps the shapes racecheck can get through in minutes."""
import argparse
import math

import torch

import pgest


def leaf(x):
    return x.detach().clone().requires_grad_()


def row_ops(x: torch.Tensor, S: int) -> None:
    K = x.shape[1]
    s = pgest.sample(x, num_samples=S)
    acts = s.actions.clone()
    acts.view(acts.shape[0], -1)[::3, 0] = -100  # ignored entries
    y = leaf(x)
    lp, ent = pgest.log_prob(y, acts)
    (lp.sum() + ent.sum()).backward()
    y = leaf(x)
    adv = torch.randn(acts.shape, device=x.device)
    pgest.policy_loss(y, acts, adv, entropy_weight=0.01).backward()
    d = pgest.Categorical(logits=leaf(x))
    a = d.sample()
    (d.log_prob(a).sum() + d.entropy().sum()).backward()
    lsm = torch.log_softmax(x.float(), -1).to(x.dtype)
    labels = torch.randint(0, K, (x.shape[0],), device=x.device)
    pgest.reinforce_grad(lsm, labels, num_samples=S, baseline="mean")
    table = torch.randn(x.shape[0], K, device=x.device)
    pgest.reinforce_grad(lsm, reward_table=table, num_samples=max(S, 2), baseline="rloo")
    # the truncation kernel (shared-memory histograms, atomics): each filter, greedy, per-row settings
    temps = torch.rand(x.shape[0], device=x.device) + 0.3
    temps[0] = 0.0
    t = pgest.sample(x, num_samples=S, temperature=temps, top_k=7, top_p=0.9, min_p=0.01)
    y = leaf(x)
    lp, ent = pgest.log_prob(y, t.actions, temperature=temps, top_k=7, top_p=0.9, min_p=0.01)
    (lp.sum() + ent.sum()).backward()
    pgest.log_prob(leaf(x), t.actions, temperature=temps, threshold=t.truncation.cut)


def refused_rows(x: torch.Tensor) -> None:
    K = x.shape[1]
    bad = x.clone()
    bad[0, K // 2] = math.nan
    if bad.shape[0] > 1:
        bad[1] = -math.inf
    acts = torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)
    acts[-1] = K  # out of range
    labels = acts.clone()
    for sync in (True, False):
        with pgest.sync_errors(sync):
            for call in (lambda: pgest.sample(bad, num_samples=2),
                         lambda: pgest.log_prob(leaf(x), acts, ignore_index=None),
                         lambda: pgest.reinforce_grad(torch.log_softmax(bad.float(), -1), labels)):
                try:
                    call()
                    pgest.check_errors()
                except (ValueError, IndexError):
                    pass
                else:
                    raise AssertionError("a refused row went unreported")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="shapes for racecheck")
    p.add_argument("--device", default="cuda", help="cpu: a dry run of this script where no GPU is")
    args = p.parse_args()
    small, dev = args.small, torch.device(args.device)
    shapes = [(7, 1), (33, 2049), (300, 12), (2, 40000)] if small else \
        [(7, 1), (33, 2049), (70000, 12), (3, 262144), (257, 32000)]
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        for R, K in shapes:
            x = (torch.randn(R, K, device=dev) * 3).to(dtype)
            for logits in (x, x.T.contiguous().T):  # contiguous and column-major
                for S in (1, 3) if small else (1, 3, 20):
                    row_ops(logits, S)
            refused_rows(x)
    T, B = (16, 300) if small else (64, 70000)
    rewards, values = torch.randn(T, B, device=dev), torch.randn(T, B, device=dev)
    dones = torch.rand(T, B, device=dev) < 0.05
    pgest.gae(rewards, values, dones, 0.99, 0.95, last_value=torch.randn(B, device=dev))
    pgest.discounted_returns(rewards, dones.float(), 0.99)
    h = torch.randn(50, 64, device=dev, requires_grad=True)
    w = (torch.randn(5000, 64, device=dev) / 8).requires_grad_()
    acts = torch.randint(0, 5000, (50,), device=dev)
    lp, ent = pgest.linear_log_prob(h, w, acts, token_tile=16, vocab_tile=1024)
    (lp.sum() + ent.sum()).backward()
    pgest.linear_policy_loss(h, w, acts, torch.randn(50, device=dev), token_tile=16, vocab_tile=1024).backward()
    pgest.linear_sample(h.detach(), w.detach(), num_samples=2, token_tile=16, vocab_tile=1024)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    pgest.check_errors()
    print("gpu_sanitize: every op ran")


if __name__ == "__main__":
    main()
