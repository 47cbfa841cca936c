"""KL's role, shown: train notebook 03's PPO with the KL penalty off and with the anti-collapse guard off, next
to the notebook's own settings; write `notebooks/figures/03_kl_role.{json,png}`.

    python scripts/kl_role.py            # tiny profile, offline, from an empty temporary output folder

Notebook 03 reads the JSON and shows the PNG, so CI does not spend minutes on runs meant to go wrong. Runs go
one after another (each trains for the profile's `ppo_steps`); stages 1-2 are trained once and shared. On a
busy machine, run the variants as separate processes and merge them (the runs do not depend on each other):

    python scripts/kl_role.py --output-dir OUT --variants "no KL penalty" --part /tmp/no-kl.json   # one per variant
    python scripts/kl_role.py --merge /tmp/*.json
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIGURES = ROOT / "notebooks" / "figures"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="tiny")
    parser.add_argument("--output-dir", help="reuse this run folder's stages 1-2 (default: a new temporary folder)")
    parser.add_argument("--steps", type=int, help="PPO steps per run (default: the profile's ppo_steps)")
    parser.add_argument("--variants", nargs="+", help="only these runs (names of marl_utils.studies.kl_role.VARIANTS)")
    parser.add_argument("--part", help="write this process's runs here instead of notebooks/figures")
    parser.add_argument("--merge", nargs="+", help="join --part files into notebooks/figures/03_kl_role.{json,png}")
    args = parser.parse_args(argv)
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(name, "1")
    sys.path.insert(0, str(ROOT))
    from marl_utils.studies.kl_role import VARIANTS, load_results, plot_kl_role, run_variants, save_results
    from marl_utils.stages.ppo_parts import ensure_earlier_stages
    from marl_utils.infra.profiles import resolve_profile
    from marl_utils.infra.runs import prepare_run_dir

    profile = resolve_profile(args.profile)
    if args.merge:
        parts = [load_results(path) for path in args.merge]
        runs = {name: part["runs"][name] for name in VARIANTS for part in parts if name in part["runs"]}
        write(runs, profile, plot_kl_role, save_results, FIGURES / "03_kl_role.json")
        return
    out = prepare_run_dir(args.output_dir or tempfile.mkdtemp(prefix="kl_role-"), profile)
    ensure_earlier_stages(profile, out, progress=False)
    start = time.perf_counter()
    variants = {name: VARIANTS[name] for name in args.variants} if args.variants else VARIANTS
    results = run_variants(profile, out, variants, steps=args.steps)
    print(f"{len(results)} runs in {time.perf_counter() - start:.0f} s")
    write(results, profile, plot_kl_role, save_results, Path(args.part) if args.part else FIGURES / "03_kl_role.json",
          figure=not args.part)


def write(results, profile, plot_kl_role, save_results, path: Path, figure: bool = True) -> None:
    save_results({"profile": profile.name, "target_kl": profile.ppo_target_kl, "runs": results}, path)
    if figure:
        plot_kl_role(results, target_kl=profile.ppo_target_kl, save_to=path.with_suffix(".png"))
    for name, result in results.items():
        print(name, {k: round(v, 2) for k, v in result["after"].items()})


if __name__ == "__main__":
    main()
