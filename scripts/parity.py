"""Does one base converge like four models? PPO on every layout over several seeds: table, figure, raw numbers.

    MARL_PROFILE=tiny python scripts/parity.py [--seeds 0 1 2 3 4] [--steps N] [--layouts ...] [--output-dir OUT]
                                               [--results-dir notebooks/figures] [--report-only] [--fresh]

Stages 1-2 come from the run folder (`OUT`, default: the one the notebooks use) and are trained there only if
missing. Every run uses the same training and held-out prompts; a seed sets the policy adapter's initialisation
and the trainer's sampling, the same for every layout. Runs go seed by seed (every layout of seed 0, then of
seed 1, ...), so a sweep cut short still compares equal numbers of seeds, and each finished run is appended as
one JSON line to `parity_<profile>_runs.jsonl`; a second call skips the runs already there (`--fresh` starts
over). At the end (or with `--report-only`) it writes next to that file:

    parity_<profile>.png        proxy and gold reward and KL per PPO step, mean ± sd band over seeds, per layout
    parity_<profile>_runs.csv   one row per run (the raw per-seed numbers)
    parity_<profile>_table.md   mean ± sd per layout, the difference to the separate layout [Welch 95%], verdicts
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import sys
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_key(row: dict) -> tuple:
    return row["layout"], row["seed"], row["steps"], row.get("batch")


def read_runs(path: Path) -> list[dict]:
    """The runs saved so far: a line cut by a killed sweep is skipped, and of a run saved twice (two sweeps that
    overlapped) the first."""
    rows, seen = [], set()
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if run_key(row) not in seen:
                seen.add(run_key(row))
                rows.append(row)
    return rows


def append_run(path: Path, row: dict) -> None:
    """One line per run, in one write() on a file opened for appending: two sweeps (disjoint seeds) may share it."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(row) + "\n").encode())
    finally:
        os.close(fd)


def write_report(rows: list[dict], results: Path, profile_name: str, header: str) -> str:
    from marl_utils.infra.atomic import atomic_write_text
    from marl_utils.studies.parity import METRICS, compare, format_table, plot_parity

    stem = f"parity_{profile_name}"
    table = compare(rows)
    text = header + "\n\n" + format_table(table) + "\n"
    atomic_write_text(results / f"{stem}_table.md", text)
    columns = ["layout", "seed", "steps", "batch", "proxy before", "proxy after", "proxy gain", "gold before", "gold after",
               "gold gain", "final KL", "distinct-2", "response tokens", "seconds"]
    tmp = results / f".{stem}_runs.csv.tmp"
    with tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([f"{row[c]:.4f}" if isinstance(row[c], float) else row[c] for c in columns])
    tmp.replace(results / f"{stem}_runs.csv")
    steps = sorted({row["steps"] for row in rows})
    plot_parity(rows, save_to=results / f"{stem}.png",
                title=f"{profile_name}: {steps[0] if len(steps) == 1 else steps} PPO steps, training rollouts; "
                      "band = ±1 sd over seeds")
    assert set(METRICS) <= set(rows[0])
    return text


def main(argv=None) -> int:
    import torch

    from marl_utils.data.loading import load_imdb
    from marl_utils.infra.errors import MarlInputError
    from marl_utils.data.gold_reward import gold_scores
    from marl_utils.studies.parity import BASELINE, LAYOUTS, check_layouts, run_layout
    from marl_utils.stages.ppo_parts import ensure_earlier_stages, policy_lora_config, ppo_config
    from marl_utils.infra.profiles import resolve_profile
    from marl_utils.data.prompts import load_prompts
    from marl_utils.infra.runs import prepare_run_dir, stage_dir

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default=None)
    parser.add_argument("--output-dir", default=None, help="run folder whose stages 1-2 are reused")
    parser.add_argument("--results-dir", default=str(REPO / "notebooks" / "figures"),
                        help="where the JSON lines, CSV, table and figure go (default: notebooks/figures)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--steps", type=int, default=None, help="PPO steps per run (default: parity_ppo_steps)")
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), help=f"default: all of {list(LAYOUTS)}")
    parser.add_argument("--shard", default="1/1", help="K/N: run only every N-th run, from the K-th (parallel sweeps)")
    parser.add_argument("--report-only", action="store_true", help="only rebuild table, CSV and figure")
    parser.add_argument("--fresh", action="store_true", help="forget the runs saved before (else they are skipped)")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)  # the tiny model's matmuls gain nothing from threads; the sweep shares 2 cores
    try:
        profile = resolve_profile(args.profile)
        layouts = check_layouts(args.layouts)
        steps = args.steps or profile.parity_ppo_steps
        shard, shards = (int(x) for x in args.shard.split("/")) if re.fullmatch(r"\d+/\d+", args.shard) else (0, 0)
        if not 1 <= shard <= shards:
            raise MarlInputError(f"--shard {args.shard}: use K/N with 1 <= K <= N, e.g. 1/2 and 2/2 for two sweeps")
        if steps < 1 or len(set(args.seeds)) < 2:
            raise MarlInputError(f"--steps {steps} --seeds {args.seeds}: need at least 1 step and 2 different seeds "
                                 "(the interval needs a spread)")
        results = Path(args.results_dir)
        results.mkdir(parents=True, exist_ok=True)
        runs_path = results / f"parity_{profile.name}_runs.jsonl"
        header = (f"profile {profile.name}, {steps} PPO steps of {profile.parity_batch_size} rollouts (minibatch "
                  f"{profile.parity_mini_batch_size}) per run, seeds {args.seeds}; {profile.parity_eval_prompts} held-out prompts "
                  f"(proxy and gold gain: after minus before training; final KL in nats per sequence; distinct-2 "
                  f"after); Δ: layout minus {BASELINE}, Welch 95% interval")
        if args.report_only:
            rows = [row for row in read_runs(runs_path) if row["steps"] == steps
                    and row["batch"] == profile.parity_batch_size and row["seed"] in args.seeds]
            if not rows:
                raise MarlInputError(f"{runs_path} holds no runs; run the sweep first (without --report-only)")
            print(write_report(rows, results, profile.name, header))
            return 0
        if args.fresh and runs_path.exists():
            runs_path.unlink()
        out = prepare_run_dir(args.output_dir, profile)
        ensure_earlier_stages(profile, out, progress=False)  # reused when the folder already has them
        sft_dir, reward_dir = stage_dir(out, "sft"), stage_dir(out, "reward_adapter")
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(sft_dir)
        data = load_imdb(profile.dataset)
        lo, hi = profile.ppo_prompt_tokens
        prompts = load_prompts(data["train"]["text"], tokenizer, min_tokens=lo, max_tokens=hi, n=2000, seed=0)
        eval_prompts = load_prompts(data["test"]["text"], tokenizer, min_tokens=lo, max_tokens=hi,
                                    n=profile.parity_eval_prompts, seed=1)
    except MarlInputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    batch = profile.parity_batch_size
    start = time.perf_counter()
    todo = [(seed, layout) for seed in args.seeds for layout in layouts]  # seed by seed: a cut sweep stays balanced
    for seed, layout in todo[shard - 1::shards]:
        if (layout, seed, steps, batch) in {run_key(row) for row in read_runs(runs_path)}:  # another sweep's too
            print(f"seed {seed} {layout}: saved before, skipped")
            continue
        config = replace(ppo_config(profile, seed=seed, steps=steps), batch_size=batch,
                         mini_batch_size=profile.parity_mini_batch_size)
        row = run_layout(layout, sft_dir, reward_dir, policy_lora_config(profile), config, prompts, eval_prompts,
                         gold_scores)
        append_run(runs_path, row)
        print(f"seed {seed} {layout:>20}: proxy {row['proxy gain']:+.2f}, gold {row['gold gain']:+.2f}, KL "
              f"{row['final KL']:.1f}, distinct-2 {row['distinct-2']:.2f}, {row['seconds']:.0f}s "
              f"({time.perf_counter() - start:.0f}s in all)", flush=True)
    rows = [row for row in read_runs(runs_path)
            if row["steps"] == steps and row["batch"] == batch and row["seed"] in args.seeds]
    if BASELINE not in {row["layout"] for row in rows}:
        print(f"no run of the baseline {BASELINE!r} yet: no table (run it, then --report-only)")
        return 0
    print(write_report(rows, results, profile.name, header))
    return 0


if __name__ == "__main__":
    sys.exit(main())
