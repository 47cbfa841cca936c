"""A small PPO run on the tiny stand-ins, as a program: what test_fault_tolerance kills and resumes.

    python tests/ppo_worker.py BASE REWARD_ADAPTER OUT [--steps 6] [--save-every 1] [--pause S]
                               [--stall-in-save K --marker FILE] [--resume]

`build_trainer` and `prompts` are imported by the tests too, so the run a test kills and the run it
compares with are built by the same code. `--pause` sleeps after each step (the kill then lands mid-run,
not after the end); `--stall-in-save K` writes part of checkpoint K, touches FILE and hangs there, so a
test can kill the process in the middle of a checkpoint write.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

PROMPT_TEXTS = ["the movie", "i loved this movie a", "bad", "a wonderful film with", "the plot was", "it was",
                "terrible acting and", "boring dull and"]


def build_trainer(base, reward_adapter, *, steps: int = 6, save_every: int = 1, seed: int = 0, lora_r: int = 4,
                  tokenizer=None, **config):
    """Policy LoRA + value head + reward adapter on one tiny base, and a PPOTrainer at toy sizes (`config`: more
    PPOConfig fields; `tokenizer`: instead of the base's own)."""
    from peft import LoraConfig
    from transformers import AutoTokenizer

    from marl_utils import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer

    torch.manual_seed(seed)
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(base)
    lora = LoraConfig(r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                      task_type="CAUSAL_LM")
    model = AutoModelForCausalLMWithValueHead.from_pretrained(str(base), peft_config=lora,
                                                              reward_adapter=str(reward_adapter))
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

    torch.save = save_then_stall  # marl_utils.checkpoint calls torch.save


def main(argv=None) -> None:
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
