"""Turns a pytest-benchmark JSON of bench_depthwise.py into the README's markdown table."""
import json
import sys

from lkfast.bench import summarize


def main(path: str) -> None:
    data = json.load(open(path))
    rows, peak = [], None
    for b in data["benchmarks"]:
        info = b["extra_info"]
        if info.get("kind") == "matmul_peak":
            peak = info["flop"] / b["stats"]["min"] / 1e9
        elif info.get("kind") == "depthwise":
            rows.append({"impl": info["impl"], "passes": info["passes"], "shape": info["shape"],
                         "seconds": b["stats"]["min"], "flop": info["flop"]})
    machine = data.get("machine_info", {})
    print(f"Machine: {machine.get('cpu', {}).get('brand_raw', machine.get('processor', '?'))}, "
          f"{data.get('commit_info', {}).get('id', '')[:8]} {data.get('datetime', '')}")
    print()
    print(summarize(rows, peak or float("nan")))


if __name__ == "__main__":
    main(sys.argv[1])
