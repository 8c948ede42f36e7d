"""GPU benchmarks of every op against the reference recipe (eager, on the GPU),
the compiled pure-PyTorch formulation and, for policy_loss, Liger-Kernel's
cross entropy where it is installed; plus the device-to-device copy bandwidth.
Bytes moved count every input read once and every output written once.

    python bench/gpu_bench.py --out bench/results
"""
import argparse
import datetime
import json
import os

import harness as B
import torch

import pgest
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


def copy_bandwidth(dev) -> float:
    """Device-to-device copy of 1 GiB: bytes read plus bytes written, per second."""
    big = torch.empty(2**30, dtype=torch.uint8, device=dev)
    return 2 * big.numel() / cuda_time(big.clone) / 1e9


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="bench/results")
    args = p.parse_args()
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(dev)
    rows = []
    copy_gbs = copy_bandwidth(dev)
    for (Bsz, K), dname in SHAPES:
        dt = DT[dname]
        g = torch.Generator(device=dev).manual_seed(0)
        x = torch.randn(Bsz, K, device=dev, generator=g).to(dt)
        labels = torch.randint(0, K, (Bsz,), device=dev, generator=g)
        base = torch.rand(Bsz, device=dev, generator=g)
        adv = torch.randn(Bsz, device=dev, generator=g)
        nbytes = x.numel() * x.element_size()
        lp = x.float().log_softmax(-1).to(dt)
        cases = {
            ("reinforce_grad", "pgest"): (lambda: pgest.reinforce_grad(lp, labels, baseline=base), 2 * nbytes),
            ("reinforce_grad", "recipe"): (lambda: recipe_step(lp, labels, base), 2 * nbytes),
            ("reinforce_grad", "compiled"): (lambda: B.compiled(B.gumbel_formulation)(lp, labels, base), 2 * nbytes),
            ("sample", "pgest"): (lambda: pgest.sample(x), nbytes),
            ("policy_loss fwd", "pgest"): (lambda: pgest.policy_loss(x, labels, adv), nbytes),
        }
        xr = x.clone().requires_grad_()
        cases[("policy_loss fwd+bwd", "pgest")] = (B.train_step(lambda a, b, c: pgest.policy_loss(a, b, c), xr, labels, adv), 3 * nbytes)
        cases[("policy_loss fwd+bwd", "eager")] = (B.train_step(B.eager_policy_loss, xr, labels, adv), 3 * nbytes)
        cases[("policy_loss fwd+bwd", "compiled")] = (B.train_step(B.compiled(B.eager_policy_loss), xr, labels, adv), 3 * nbytes)
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
                s = cuda_time(fn)
            except Exception as e:  # noqa: BLE001 - record and go on
                rows.append({"op": op, "provider": prov, "shape": [Bsz, K], "dtype": dname, "error": str(e)})
                continue
            rows.append({"op": op, "provider": prov, "shape": [Bsz, K], "dtype": dname, "seconds": s,
                         "bytes": moved, "gbs": moved / s / 1e9, "of_copy_bw": moved / s / 1e9 / copy_gbs})
    stamp = datetime.date.today().isoformat()
    tag = name.replace(" ", "_")
    os.makedirs(args.out, exist_ok=True)
    data = {"device": name, "date": stamp, "copy_gbs": copy_gbs, "torch": torch.__version__,
            "pgest": pgest.build_info(), "rows": rows}
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
    with open(os.path.join(args.out, f"{tag}-{stamp}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
