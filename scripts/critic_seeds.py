"""The three critics of notebook 06 over several seeds: one table of mean ± sd per critic.

    MARL_PROFILE=tiny python scripts/critic_seeds.py [--seeds 0 1 2] [--steps N] [--output-dir OUT] [--json F]

Stages 1-2 come from the run folder (`OUT`, default: the one the notebooks use) and are trained there only if
missing. Every run uses the same training and held-out prompts; a seed sets the policy's initialisation and
the trainer's sampling, the same for every critic. Besides notebook 06's three critics it runs a control, a
FRESH critic adapter with the reward adapter's LoRA shape: the copied critic has that (larger) shape too, so
the control tells the copy's head start from the extra capacity. The critics of one seed train side by side in one
process with one thread, one step of each in turn, so their seconds per step are comparable even when the
machine is shared (absolute seconds are not: say so).
"""

from __future__ import annotations

import argparse
import sys
import time


def main(argv=None) -> int:
    import torch

    from marl_utils.infra.atomic import atomic_write_json
    from marl_utils.display.critic_report import CONTROLS, CRITICS, format_seed_table, run_critics, seed_table, summarize
    from marl_utils.infra.errors import MarlInputError
    from marl_utils.stages.ppo_parts import ensure_earlier_stages, policy_lora_config, ppo_config, ppo_prompts
    from marl_utils.infra.profiles import resolve_profile
    from marl_utils.infra.runs import prepare_run_dir, stage_dir

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default=None)
    parser.add_argument("--output-dir", default=None, help="run folder whose stages 1-2 are reused")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=None, help="PPO steps per run (default: critic_ppo_steps)")
    parser.add_argument("--window", type=int, default=10, help="steps averaged for the first/last columns")
    parser.add_argument("--critics", nargs="+", default=list(CRITICS) + list(CONTROLS),
                        choices=list(CRITICS) + list(CONTROLS),
                        help="default: the three of notebook 06 and the control (a fresh critic of the reward's shape)")
    parser.add_argument("--json", default=None, help="also write every run's row (and the table) here")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)  # the tiny model's matmuls gain nothing from threads; timings stay comparable
    try:
        profile = resolve_profile(args.profile)
        steps = args.steps or profile.critic_ppo_steps
        if args.window < 1 or steps < 2 * args.window:
            raise MarlInputError(f"--steps {steps} with --window {args.window}: use a window of at least 1 step and at "
                                 "least twice as many steps, so that the first and last windows do not overlap")
        out = prepare_run_dir(args.output_dir, profile)
        ensure_earlier_stages(profile, out, progress=False)  # reused when the folder already has them
        sft_dir, reward_dir = stage_dir(out, "sft"), stage_dir(out, "reward_adapter")
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(sft_dir)
        tokenizer.padding_side = "left"
        prompts, eval_prompts = ppo_prompts(profile, tokenizer, steps=steps)   # notebook 06's prompts (seed 0)
    except MarlInputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    rows, histories, start = [], [], time.perf_counter()
    for seed in args.seeds:
        runs = run_critics(args.critics, sft_dir, reward_dir, policy_lora_config(profile),
                           ppo_config(profile, seed=seed, steps=steps), prompts, eval_prompts)
        for label, run in runs.items():
            row = summarize(run, args.window)
            rows.append(row)
            histories.append({"critic": label, "seed": seed, "history": [
                {k: v for k, v in entry.items() if isinstance(v, (int, float))} for entry in run.history]})
            print(f"seed {seed} {label:>28}: gain {row['reward gain']:+.2f}, KL {row['final KL']:.1f}, value loss "
                  f"{row['value loss first']:.3f} -> {row['value loss last']:.3f}, expl. var. "
                  f"{row['expl. var. first']:+.2f} -> {row['expl. var. last']:+.2f}, {row['s/step']:.2f} s/step",
                  flush=True)
        print(f"seed {seed}: {runs[args.critics[0]].seconds:.0f}s for the {len(runs)} critics side by side", flush=True)
    table = seed_table(rows)
    columns = ["reward gain", "final KL", "value loss first", "value loss last", "expl. var. first",
               "expl. var. last", "s/step"]
    print(f"\nprofile {profile.name}, {steps} PPO steps per run, seeds {args.seeds}, first/last = mean over "
          f"{args.window} steps; {time.perf_counter() - start:.0f}s in all\n")
    print(format_seed_table(table, columns))
    if args.json:
        atomic_write_json(args.json, {"profile": profile.name, "steps": steps, "seeds": args.seeds,
                                      "window": args.window, "rows": rows, "histories": histories,
                                      "table": [{k: list(v) if isinstance(v, tuple) else v for k, v in r.items()}
                                                for r in table]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
