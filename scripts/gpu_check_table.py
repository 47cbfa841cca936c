"""The one table at the end of scripts/gpu_check.sh: a row per part, bench rows read from their bench.json.

    python scripts/gpu_check_table.py STATUS_TSV MODE ELAPSED_S BUDGET_S

STATUS_TSV rows are `part<TAB>result<TAB>seconds<TAB>detail`; a detail `json:PATH` is a `marl bench` result,
shown as its ratios to the compute floor (ratio of medians; per-step min-max of the total).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

LABELS = {"marl": "MARL", "separate": "separate", "critic_adapter": "critic adapter"}


def bench_figures(path: Path) -> str:
    summary = json.loads(path.read_text())
    comparison = summary["floor_comparison"]
    floor = comparison["median_seconds"]["floor"]
    parts = [f"{comparison['steps']}/{comparison['steps_requested']} steps, floor {floor['total']:.3f} s/step"]
    for name, label in LABELS.items():
        row = comparison["ratios"].get(name)
        if row is not None:
            used = comparison["precision_used"].get(name)
            ran = f" ran {used}" if used not in (None, comparison["precision"], "no") else ""
            phases = " ".join(f"{key[:5]} {row[key]:.2f}" if row.get(key) is not None else f"{key[:5]} -"
                              for key in ("generate", "score", "rollout", "optimise"))
            parts.append(f"{label} {row['total']:.2f}x ({row['total_pair_min']:.2f}-{row['total_pair_max']:.2f}; "
                         f"{phases}{ran})")
        elif name in comparison["unavailable"]:
            parts.append(f"{label}: {comparison['unavailable'][name][:40]}")
    return "; ".join(parts)


def main(argv) -> int:
    status, mode, elapsed, budget = Path(argv[1]), argv[2], int(argv[3]), int(argv[4])
    rows = []
    for line in status.read_text().splitlines():
        part, result, seconds, detail = (line.split("\t") + ["", "", "", ""])[:4]
        if detail.startswith("json:"):
            try:
                detail = bench_figures(Path(detail[5:]))
            except (OSError, KeyError, ValueError) as err:
                detail = f"unreadable bench.json ({type(err).__name__})"
        rows.append((part, result, seconds, detail))
    width = max([len(r[0]) for r in rows] + [4])
    print()
    print(f"GPU check ({'DRY RUN, no CUDA' if mode == 'dry' else 'CUDA'}): {elapsed} s of a {budget} s budget")
    print(f"{'part':<{width}}  {'result':<16}{'s':>5}  figures (bench: ours / compute floor)")
    print("-" * (width + 26 + 40))
    for part, result, seconds, detail in rows:
        print(f"{part:<{width}}  {result:<16}{seconds:>5}  {detail}")
    if mode == "dry":
        print("CUDA IS MISSING: the notebooks did not run on CUDA and the GPT-2 bench did not run; this was a dry run.")
    failed = [r for r in rows if r[1].startswith("FAILED")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
