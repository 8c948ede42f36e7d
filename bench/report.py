"""Turn pytest-benchmark JSON into the README's markdown table.

    python bench/report.py bench/results/cpu-reinforce_grad.json [more.json ...]

Ratios are medians from the same run: "x seed" is how many times faster pgest
is than the seed's listing, "x compiled" likewise, "x copy" is pgest's time
over a copy of the input (1.0 would be the memory floor).
"""
import json
import sys
from collections import defaultdict


def load(paths):
    rows = defaultdict(dict)
    machine = None
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        machine = machine or data.get("machine_info", {})
        for b in data["benchmarks"]:
            info = b["extra_info"]
            key = (info["op"], tuple(info["shape"]), info["dtype"])
            rows[key][info["provider"]] = b["stats"]["median"]
    return rows, machine


def table(rows):
    head = "| op | shape (B, K) | dtype | pgest | seed listing | compiled | copy | x seed | x compiled | x copy |"
    out = [head, "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for (op, shape, dtype), t in rows.items():
        p = t.get("pgest")
        if p is None:
            continue

        def ms(v):
            return f"{v * 1e3:.3f} ms" if v is not None else "-"

        def ratio(v):
            return f"{v / p:.1f}x" if v is not None else "-"

        copy = t.get("copy")
        over_copy = f"{p / copy:.2f}x" if copy else "-"
        out.append(
            f"| {op} | {shape[0]} x {shape[1]} | {dtype} | {ms(p)} | {ms(t.get('seed'))} | "
            f"{ms(t.get('compiled'))} | {ms(copy)} | {ratio(t.get('seed'))} | {ratio(t.get('compiled'))} | "
            f"{over_copy} |"
        )
    return "\n".join(out)


if __name__ == "__main__":
    rows, machine = load(sys.argv[1:])
    cpu = machine.get("cpu", {}).get("brand_raw", "?")
    print(f"Machine: {cpu}, {machine.get('cpu', {}).get('count', '?')} cores; medians of 15 rounds.\n")
    print(table(rows))
