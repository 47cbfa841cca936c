"""The `marl` command (also `python -m marl_utils`): each stage, or the whole pipeline.

    marl sft     [--profile P] [--dataset SRC] [--output-dir OUT]   stage 1 -> OUT/sft/
    marl reward  [--profile P] [--dataset SRC] [--output-dir OUT]   stage 2 -> OUT/reward_adapter/
    marl ppo     [--profile P] [--dataset SRC] [--output-dir OUT]   stage 3 -> OUT/ppo/
    marl run     [--profile P] [--dataset SRC] [--output-dir OUT]   all three + plots + summary.json
                 [--algo ppo|grpo|rloo]                             stage 3 with PPO, or TRL's GRPO / RLOO trainer
    marl grpo    [--algo grpo|rloo] [--profile P] [--output-dir OUT]  stage 3 with TRL's trainer -> OUT/grpo/ (rloo/)
                 (each also takes --base-model NAME_OR_DIR: any causal LM instead of the profile's base)
    marl bench   [--profile P] [--base-size tiny|mid|large|gpt2] [--precision fp32|bf16] [--device cpu|cuda]
                 [--steps 5] [--time-budget S] [--timing-only] [--profile-step] [--output-dir OUT]

Bad input ends the command with one line, `error: <what was wrong and how to fix it>`, exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from .infra.errors import MarlInputError


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", default=None,
                        help="tiny (offline, CPU) or gpt2-imdb (Hub, GPU); default: $MARL_PROFILE, else by CUDA")
    parser.add_argument("--dataset", default=None,
                        help="offline | a Hub id (stanfordnlp/imdb) | a .parquet/.csv/.tsv/.jsonl file or folder "
                             "with text,label columns")
    parser.add_argument("--output-dir", default=None, help="run folder (default: runs/<profile>)")
    parser.add_argument("--base-model", default=None, metavar="NAME_OR_DIR",
                        help="start from this causal LM (a local folder or a Hub id) instead of the profile's base; "
                             "the profile's sizes stay")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="retrain this stage even if its folder exists")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="marl", description="Multi-Adapter RL: SFT -> reward adapter -> PPO")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in [("sft", "stage 1: supervised fine-tuning"),
                            ("reward", "stage 2: train the reward adapter"),
                            ("ppo", "stage 3: PPO on a policy adapter, scored by the reward adapter"),
                            ("grpo", "stage 3 with TRL's GRPOTrainer (--algo rloo: RLOOTrainer), same reward adapter"),
                            ("run", "stages 1-3 end to end, with plots and summary.json")]:
        p = sub.add_parser(name, help=help_text)
        _common(p)
        if name in ("ppo", "run"):
            p.add_argument("--steps", type=int, default=None, help="PPO steps (default: the profile's)")
            p.add_argument("--resume", action="store_true", help="continue PPO from the last checkpoint")
        if name in ("grpo", "run"):
            algos = ["grpo", "rloo"] if name == "grpo" else ["ppo", "grpo", "rloo"]
            p.add_argument("--algo", default=algos[0], choices=algos, help="stage 3's trainer")
        if name == "grpo":
            p.add_argument("--steps", type=int, default=None, help="generation rounds (default: the profile's)")
    bench = sub.add_parser("bench", help="memory and time: one shared base vs separate models")
    bench.add_argument("--profile", default=None)
    bench.add_argument("--base-size", default="mid", choices=["tiny", "mid", "large", "gpt2"],
                       help="random-init base: tiny, mid (46M Llama-style), large (210M), gpt2 (124M GPT-2)")
    bench.add_argument("--output-dir", default=None)
    bench.add_argument("--steps", type=int, default=5,
                       help="timed PPO steps per runner (floor and each layout, interleaved) after a warm-up")
    bench.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                       help="compute precision of the timing (bf16: autocast)")
    bench.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda if available")
    bench.add_argument("--time-budget", type=float, default=None,
                       help="seconds for the timed part, loading included; stops early (>= 2 steps) to fit")
    bench.add_argument("--timing-only", action="store_true", help="skip the memory part (a process per layout)")
    bench.add_argument("--compare", default="marl,separate,critic_adapter",
                       help="layouts timed against the compute floor, comma-separated")
    bench.add_argument("--profile-step", action="store_true",
                       help="also profile one training minibatch of PPOTrainer vs the compute floor")
    return parser


def run_command(args) -> int:
    from .infra.profiles import resolve_profile

    if args.command == "bench":
        from .bench.command import run_bench

        run_bench(resolve_profile(args.profile), output_dir=args.output_dir, base_size=args.base_size,
                  steps=args.steps, precision=args.precision, device=args.device, time_budget=args.time_budget,
                  memory=not args.timing_only, profile_step=args.profile_step,
                  compare=tuple(name for name in args.compare.split(",") if name))
        return 0
    profile = resolve_profile(args.profile)
    if args.base_model:
        from .infra.profiles import with_base_model

        profile = with_base_model(profile, args.base_model)
    if args.command == "sft":
        from .stages.sft import train_sft

        train_sft(profile, args.output_dir, args.dataset, seed=args.seed, force=args.force)
    elif args.command == "reward":
        from .stages.reward import train_reward_adapter

        train_reward_adapter(profile, args.output_dir, args.dataset, seed=args.seed, force=args.force)
    elif args.command == "ppo":
        from .stages.ppo import run_ppo_stage

        run_ppo_stage(profile, args.output_dir, args.dataset, seed=args.seed, force=args.force,
                      steps=args.steps, resume=args.resume)
    elif args.command == "grpo":
        from .stages.grpo import train_grpo

        train_grpo(profile, args.output_dir, args.dataset, algo=args.algo, seed=args.seed, force=args.force,
                   steps=args.steps)
    elif args.command == "run":
        from .stages.pipeline import run_pipeline

        run_pipeline(profile, args.output_dir, args.dataset, seed=args.seed, force=args.force,
                     steps=args.steps, resume=args.resume, algo=args.algo)
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if os.environ.get("CI"):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        code = run_command(args)
    except MarlInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if "torch.distributed" in sys.modules:   # a torchrun job (marl ppo under torchrun): leave it cleanly
        from .ppo.accelerator import leave_process_group

        leave_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
