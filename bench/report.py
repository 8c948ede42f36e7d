"""Turn pytest-benchmark JSON into the README's markdown tables, one per op.

    python bench/report.py bench/results/cpu-2026-11-21.json [more.json ...]

The tables are harness.table's (the same as `pgest bench` prints):
medians of the recorded rounds, every ratio between providers of one run.
"""
import json
import sys

from harness import table


def rows_of(paths):
    rows, machine = [], {}
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        machine = machine or data.get("machine_info", {})
        for b in data["benchmarks"]:
            info = b["extra_info"]
            if "interleaved_seconds" in info:  # every provider of the shape, timed in alternation
                alloc = info.get("alloc_bytes_by_provider", {})
                for provider, sec in info["interleaved_seconds"].items():
                    rows.append({"op": info["op"], "shape": info["shape"], "dtype": info["dtype"],
                                 "provider": provider, "seconds": sec, "alloc_bytes": alloc.get(provider)})
                continue
            rows.append({"op": info["op"], "shape": info["shape"], "dtype": info["dtype"],
                         "provider": info["provider"], "seconds": b["stats"]["median"],
                         "alloc_bytes": info.get("alloc_bytes")})
    return rows, machine


if __name__ == "__main__":
    rows, machine = rows_of(sys.argv[1:])
    cpu = machine.get("cpu", {})
    print(f"Machine: {cpu.get('brand_raw', '?')}, {cpu.get('count', '?')} cores ({machine.get('system', '?')}); "
          "medians of the recorded rounds, providers of a row timed in alternation.\n")
    print(table(rows))
