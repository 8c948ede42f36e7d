"""Turn pytest-benchmark JSON into the README's markdown tables, one per op.

    python bench/report.py bench/results/cpu-reinforce_grad.json [more.json ...]

Times are medians of the recorded rounds; every ratio is taken between
providers of the same run. "x P" is how many times faster pgest is than
provider P; "/ copy" is pgest's time over a copy of the input (1.0 would be
the memory floor). "alloc MiB", where recorded, is what the step allocated
(bench/memory.py).
"""
import json
import sys
from collections import OrderedDict, defaultdict


def load(paths):
    ops = OrderedDict()
    machine = {}
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        machine = machine or data.get("machine_info", {})
        for b in data["benchmarks"]:
            info = b["extra_info"]
            rows = ops.setdefault(info["op"], OrderedDict())
            row = rows.setdefault((tuple(info["shape"]), info["dtype"]), {})
            row[info["provider"]] = (b["stats"]["median"], info.get("alloc_bytes"))
    return ops, machine


def ms(t):
    return f"{t * 1e3:.3f}" if t >= 1e-3 else f"{t * 1e3:.4f}"


def table(op, rows):
    providers = []
    for row in rows.values():
        for p in row:
            if p not in providers and p not in ("pgest", "copy"):
                providers.append(p)
    with_mem = any(v[1] is not None for row in rows.values() for v in row.values())
    head = ["shape (B, K)", "dtype", "pgest ms"] + [f"{p} ms" for p in providers] + ["copy ms"]
    head += [f"x {p}" for p in providers] + ["/ copy"]
    if with_mem:
        head += ["pgest alloc MiB"] + [f"{p} alloc MiB" for p in providers]
    lines = [f"**{op}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (shape, dtype), row in rows.items():
        if "pgest" not in row:
            continue
        p_t = row["pgest"][0]
        cells = [f"{shape[0]} x {shape[1]}", dtype, ms(p_t)]
        cells += [ms(row[p][0]) if p in row else "-" for p in providers]
        cells += [ms(row["copy"][0]) if "copy" in row else "-"]
        cells += [f"{row[p][0] / p_t:.1f}x" if p in row else "-" for p in providers]
        cells += [f"{p_t / row['copy'][0]:.2f}" if "copy" in row else "-"]
        if with_mem:
            mib = lambda v: "-" if v is None else f"{v / 2**20:.1f}"  # noqa: E731
            cells += [mib(row["pgest"][1])] + [mib(row[p][1]) if p in row else "-" for p in providers]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    ops, machine = load(sys.argv[1:])
    cpu = machine.get("cpu", {})
    print(f"Machine: {cpu.get('brand_raw', '?')}, {cpu.get('count', '?')} cores "
          f"({machine.get('system', '?')}); medians of 15 rounds.\n")
    print("\n\n".join(table(op, rows) for op, rows in ops.items()))
