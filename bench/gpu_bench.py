"""GPU benchmarks of every op against the reference recipe (eager, on the GPU),
the compiled pure-PyTorch formulation and, for policy_loss, Liger-Kernel's
cross entropy where it is installed; plus the device-to-device copy bandwidth.
Bytes moved count every input read once and every output written once.
Truncated sampling (top-p 0.95, top-k 50) beside the unfiltered sampler, and
the fused head at (4096, 4096, 128256) bf16: linear_log_prob forward +
backward (against Liger's fused linear cross entropy where installed, and
torch's materialised route), linear_sample with and without top-p and with a
soft cap, with effective TFLOP/s (the 6 N H V of a materialised forward and
backward, per second) and peak memory.

    python bench/gpu_bench.py --out bench/results
    python bench/gpu_bench.py --dry-run     # the same code on the CPU at small shapes
"""
import argparse
import datetime
import json
import os

import harness as B
import torch

import pgest
from pgest.ops.truncation import truncation_in_torch_ops
from pgest.reference import recipe_step

SHAPES = [((256, 32000), "fp32"), ((8192, 128256), "bf16"), ((4096, 10), "fp32")]
DT = {"fp32": torch.float32, "bf16": torch.bfloat16}


def cuda_time(fn, repeats=20):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    times.sort()
    return times[len(times) // 2]


def wall_time(fn, repeats=3):
    """cuda_time's stand-in for --dry-run on the CPU."""
    import time

    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def head_rows(dev, timer, N, H, V, dt) -> list:
    """The fused head: seconds, effective TFLOP/s and peak memory per case."""
    g = torch.Generator(device=dev).manual_seed(1)
    h = (torch.randn(N, H, device=dev, generator=g) * 0.5).to(dt).requires_grad_()
    w = (torch.randn(V, H, device=dev, generator=g) / H ** 0.5 * 3).to(dt).requires_grad_()
    a = torch.randint(0, V, (N,), device=dev, generator=g)
    gen = torch.Generator(device=dev).manual_seed(2)

    def fwd_bwd(lp_fn):
        def run():
            h.grad = w.grad = None
            lp, ent = lp_fn()
            (lp.float().sum() + 0.01 * ent.float().sum()).backward()
        return run

    def materialised():
        ls = (h @ w.T).float().log_softmax(-1)
        return ls.gather(-1, a[:, None])[:, 0], -(ls.exp() * ls).sum(-1)

    cases = {
        ("linear_log_prob fwd+bwd", "pgest"): fwd_bwd(lambda: pgest.linear_log_prob(h, w, a)),
        ("linear_log_prob fwd+bwd", "materialised"): fwd_bwd(materialised),
        ("linear_log_prob fwd+bwd softcap 30", "pgest"): fwd_bwd(lambda: pgest.linear_log_prob(h, w, a, softcap=30.0)),
        ("linear_sample", "pgest"): lambda: pgest.linear_sample(h.detach(), w.detach(), generator=gen),
        ("linear_sample top_p 0.95", "pgest"): lambda: pgest.linear_sample(h.detach(), w.detach(), generator=gen,
                                                                         top_p=0.95),
    }
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss(reduction="sum")

        def liger_step():
            h.grad = w.grad = None
            liger(w, h, a).backward()
        cases[("linear_log_prob fwd+bwd", "liger (cross entropy, no entropy)")] = liger_step
    except ImportError:
        pass
    rows = []
    useful = 6.0 * N * H * V  # a materialised forward and backward's products
    for (op, prov), fn in cases.items():
        try:
            if dev.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(dev)
            base = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0
            s = timer(fn)
            peak = (torch.cuda.max_memory_allocated(dev) - base) if dev.type == "cuda" else None
        except Exception as e:  # noqa: BLE001 - record and go on
            rows.append({"op": op, "provider": prov, "shape": [N, H, V], "error": str(e)})
            continue
        rows.append({"op": op, "provider": prov, "shape": [N, H, V], "seconds": s,
                     "tflops": (useful if "bwd" in op else useful / 3) / s / 1e12, "peak_bytes": peak})
    return rows


def copy_bandwidth(dev) -> float:
    """Device-to-device copy of 1 GiB: bytes read plus bytes written, per second."""
    big = torch.empty(2**30, dtype=torch.uint8, device=dev)
    return 2 * big.numel() / cuda_time(big.clone) / 1e9


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="bench/results")
    p.add_argument("--dry-run", action="store_true", help="on the CPU at small shapes, to check the script")
    args = p.parse_args()
    dry = args.dry_run
    dev = torch.device("cpu" if dry else "cuda")
    name = "dry-run-cpu" if dry else torch.cuda.get_device_name(dev)
    timer = wall_time if dry else cuda_time
    rows = []
    copy_gbs = 1.0 if dry else copy_bandwidth(dev)
    shapes = [((64, 3000), "fp32"), ((32, 5000), "bf16")] if dry else SHAPES
    for (Bsz, K), dname in shapes:
        dt = DT[dname]
        g = torch.Generator(device=dev).manual_seed(0)
        x = torch.randn(Bsz, K, device=dev, generator=g).to(dt)
        labels = torch.randint(0, K, (Bsz,), device=dev, generator=g)
        base = torch.rand(Bsz, device=dev, generator=g)
        adv = torch.randn(Bsz, device=dev, generator=g)
        nbytes = x.numel() * x.element_size()
        lp = x.float().log_softmax(-1).to(dt)
        drawn = pgest.sample(x, top_p=0.95).actions  # inside every row's kept set
        one_p = tuple(torch.tensor([v], dtype=d) for v, d in ((1.0, torch.float64), (0, torch.int64),
                                                                (0.95, torch.float64), (0.0, torch.float64)))
        cases = {
            ("reinforce_grad", "pgest"): (lambda: pgest.reinforce_grad(lp, labels, baseline=base), 2 * nbytes),
            ("reinforce_grad", "recipe"): (lambda: recipe_step(lp, labels, base), 2 * nbytes),
            ("reinforce_grad", "compiled"): (lambda: B.compiled(B.gumbel_formulation)(lp, labels, base), 2 * nbytes),
            ("sample", "pgest"): (lambda: pgest.sample(x), nbytes),
            ("sample top_p 0.95", "pgest"): (lambda: pgest.sample(x, top_p=0.95), nbytes),
            ("sample top_k 50", "pgest"): (lambda: pgest.sample(x, top_k=50), nbytes),
            # the kept set alone: the radix-descent kernel against the sort route it replaced
            ("truncation top_p 0.95", "pgest"): (lambda: pgest.truncation(x, top_p=0.95), nbytes),
            ("truncation top_p 0.95", "sort"): (lambda: truncation_in_torch_ops(x, *one_p), nbytes),
            # the trainer's side: on the GPU the kept logits are formed from the kernel's threshold
            ("log_prob top_p 0.95", "pgest"): (lambda: pgest.log_prob(x, drawn, top_p=0.95), nbytes),
            ("log_prob", "pgest"): (lambda: pgest.log_prob(x, drawn), nbytes),
            ("policy_loss fwd", "pgest"): (lambda: pgest.policy_loss(x, labels, adv), nbytes),
        }
        xr = x.clone().requires_grad_()
        cases[("policy_loss fwd+bwd", "pgest")] = (B.train_step(lambda a, b, c: pgest.policy_loss(a, b, c), xr, labels, adv), 3 * nbytes)
        cases[("policy_loss fwd+bwd", "eager")] = (B.train_step(B.eager_policy_loss, xr, labels, adv), 3 * nbytes)
        cases[("policy_loss fwd+bwd", "compiled")] = (B.train_step(B.compiled(B.eager_policy_loss), xr, labels, adv), 3 * nbytes)
        if dry:
            cases = {k: v for k, v in cases.items() if k[1] != "compiled"}
        try:
            from liger_kernel.transformers.functional import liger_cross_entropy

            cases[("policy_loss fwd+bwd", "liger")] = (
                B.train_step(lambda a, b, c: (liger_cross_entropy(a, b, reduction="none") * c).mean(), xr, labels, adv),
                3 * nbytes)
        except ImportError:
            pass
        cases[("copy", "torch")] = (lambda: x.clone(), 2 * nbytes)
        for (op, prov), (fn, moved) in cases.items():
            try:
                s = timer(fn)
            except Exception as e:  # noqa: BLE001 - record and go on
                rows.append({"op": op, "provider": prov, "shape": [Bsz, K], "dtype": dname, "error": str(e)})
                continue
            rows.append({"op": op, "provider": prov, "shape": [Bsz, K], "dtype": dname, "seconds": s,
                         "bytes": moved, "gbs": moved / s / 1e9, "of_copy_bw": moved / s / 1e9 / copy_gbs})
    head = head_rows(dev, timer, *((64, 32, 3000) if dry else (4096, 4096, 128256)), torch.bfloat16)
    stamp = datetime.date.today().isoformat()
    tag = name.replace(" ", "_")
    os.makedirs(args.out, exist_ok=True)
    data = {"device": name, "date": stamp, "copy_gbs": copy_gbs, "torch": torch.__version__,
            "pgest": pgest.build_info(), "rows": rows, "head": head}
    with open(os.path.join(args.out, f"{tag}-{stamp}.json"), "w") as f:
        json.dump(data, f, indent=1)
    lines = [f"{name}, copy {copy_gbs:.0f} GB/s", "", "| op | provider | shape | dtype | ms | GB/s | of copy |",
             "|---|---|---|---|---:|---:|---:|"]
    for r in rows:
        if "seconds" in r:
            lines.append(f"| {r['op']} | {r['provider']} | {r['shape'][0]} x {r['shape'][1]} | {r['dtype']} | "
                         f"{r['seconds'] * 1e3:.3f} | {r['gbs']:.0f} | {r['of_copy_bw']:.0%} |")
        else:
            lines.append(f"| {r['op']} | {r['provider']} | {r['shape'][0]} x {r['shape'][1]} | {r['dtype']} | "
                         f"error: {r['error'][:60]} | | |")
    lines += ["", "| fused head | provider | N x H x V | ms | effective TFLOP/s | peak MiB |", "|---|---|---|---:|---:|---:|"]
    for r in head:
        shape = " x ".join(map(str, r["shape"]))
        if "seconds" in r:
            peak = "" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:.0f}"
            lines.append(f"| {r['op']} | {r['provider']} | {shape} | {r['seconds'] * 1e3:.2f} | {r['tflops']:.0f} | "
                         f"{peak} |")
        else:
            lines.append(f"| {r['op']} | {r['provider']} | {shape} | error: {r['error'][:60]} | | |")
    with open(os.path.join(args.out, f"{tag}-{stamp}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
