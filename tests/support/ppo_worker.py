"""A small PPO run on the tiny stand-ins, as a program: what tests/ppo/test_ppo_checkpoint.py kills and resumes.

    python tests/support/ppo_worker.py BASE REWARD_ADAPTER OUT [--steps 6] [--save-every 1] [--pause S]
                               [--stall-in-save K --marker FILE] [--resume]
    python tests/support/ppo_worker.py marl [--pause S] -- ppo --profile tiny --output-dir OUT ...

`build_trainer` and `prompts` are imported by the tests too, so the run a test kills and the run it
compares with are built by the same code. `--pause` sleeps after each step (the kill then lands mid-run,
not after the end); `--stall-in-save K` writes part of checkpoint K, touches FILE and hangs there, so a
test can kill the process in the middle of a checkpoint write. `marl` runs the `marl` command with the
test-sized profile `QUICK` as `tiny`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from marl_utils.ppo.accelerator import leave_process_group  # noqa: F401  (the dist_* workers import it from here)

QUICK_SIZES = dict(
    sft_max_steps=2, sft_batch_size=8, sft_max_train_examples=32, sft_eval_examples=8, sft_max_length=48,
    reward_max_steps=2, reward_batch_size=8, reward_train_pairs=16, reward_eval_pairs=8, reward_max_length=48,
    reward_prefix_tokens=(12,), ppo_steps=8, ppo_save_every=2, ppo_batch_size=2, ppo_mini_batch_size=2,
    ppo_epochs=1, ppo_max_new_tokens=4, ppo_eval_prompts=2, ppo_prompt_tokens=(2, 3),
    tiny_model=dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128),
)
"""Sizes of the `tiny` profile that run all three stages in seconds: apply with PROFILES["tiny"].replace(**QUICK_SIZES)."""

PROMPT_TEXTS = ["the movie", "i loved this movie a", "bad", "a wonderful film with", "the plot was", "it was",
                "terrible acting and", "boring dull and"]


def build_trainer(base, reward_adapter, *, steps: int = 6, save_every: int = 1, seed: int = 0, lora_r: int = 4,
                  tokenizer=None, model_kwargs=None, **config):
    """Policy LoRA + value head + reward adapter on one tiny base, and a PPOTrainer at toy sizes (`config`: more
    PPOConfig fields; `tokenizer`: instead of the base's own; `model_kwargs`: more from_pretrained arguments)."""
    from peft import LoraConfig
    from transformers import AutoTokenizer

    from marl_utils import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer

    torch.manual_seed(seed)
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(base)
    lora = LoraConfig(r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                      task_type="CAUSAL_LM")
    model = AutoModelForCausalLMWithValueHead.from_pretrained(str(base), peft_config=lora,
                                                              reward_adapter=str(reward_adapter), **(model_kwargs or {}))
    sizes = dict(batch_size=4, mini_batch_size=2, ppo_epochs=2, learning_rate=1e-2, max_new_tokens=6,
                 min_response_tokens=0)
    cfg = PPOConfig(seed=seed, steps=steps, save_every=save_every, **{**sizes, **config})
    return PPOTrainer(cfg, model=model, tokenizer=tokenizer)


def prompts(tokenizer) -> list:
    """PROMPT_TEXTS as 1-D token tensors."""
    return [torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in PROMPT_TEXTS]


def stall_in_save(step: int, marker: Path) -> None:
    """Make the checkpoint of `step` hang after its trainer state is written into the temporary folder."""
    real_save = torch.save

    def save_then_stall(obj, path, *args, **kwargs):
        real_save(obj, path, *args, **kwargs)
        if isinstance(obj, dict) and obj.get("step_count") == step:
            marker.write_text(str(path))
            time.sleep(600)  # the test kills us here

    torch.save = save_then_stall  # marl_utils.ppo.checkpoint calls torch.save


def marl_command(argv, pause: float) -> int:
    """`marl ARGV` with the QUICK sizes as the `tiny` profile, sleeping `pause` seconds after each PPO step."""
    from marl_utils.cli import main as marl
    from marl_utils.ppo.trainer import PPOTrainer
    from marl_utils.infra.profiles import PROFILES

    PROFILES["tiny"] = PROFILES["tiny"].replace(**QUICK_SIZES)
    log_stats = PPOTrainer.log_stats

    def log_then_pause(self, *args, **kwargs):
        entry = log_stats(self, *args, **kwargs)
        time.sleep(pause)
        return entry

    PPOTrainer.log_stats = log_then_pause
    return marl(argv)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["marl"]:
        marl_parser = argparse.ArgumentParser(prog="ppo_worker.py marl")
        marl_parser.add_argument("--pause", type=float, default=0.0, help="seconds to sleep after each PPO step")
        marl_parser.add_argument("marl_args", nargs=argparse.REMAINDER, help="-- then the marl command line")
        args = marl_parser.parse_args(argv[1:])
        torch.set_num_threads(1)
        sys.exit(marl_command([a for a in args.marl_args if a != "--"], args.pause))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base")
    parser.add_argument("reward_adapter")
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--save-every", type=int, default=1)
    parser.add_argument("--pause", type=float, default=0.0, help="seconds to sleep after each step")
    parser.add_argument("--stall-in-save", type=int, default=0)
    parser.add_argument("--marker", type=Path, default=None)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    trainer = build_trainer(args.base, args.reward_adapter, steps=args.steps, save_every=args.save_every)
    if args.stall_in_save:
        stall_in_save(args.stall_in_save, args.marker)
    trainer.train(prompts(trainer.tokenizer), output_dir=args.out, resume=args.resume, progress=False,
                  callback=lambda trainer, entry: time.sleep(args.pause))
    print(f"finished at step {trainer.step_count}")


if __name__ == "__main__":
    main()
    leave_process_group()
