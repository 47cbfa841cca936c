"""Data-parallel PPO on CPU, one process per rank: what test_distributed launches with torchrun (gloo).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/support/dist_ppo_worker.py \
        BASE REWARD_ADAPTER OUT [--steps 3]

Each rank trains on its own shard of the prompts (every world_size-th one) through `PPOTrainer.train`,
then writes:
    OUT/rank{r}/           its policy adapter and value head (model.save_pretrained)
    OUT/rank{r}.json       the queries it generated for, its responses and local scores per step, the
                           statistics it logged, and digests of its policy adapter and value head
    OUT/run/checkpoints/   the checkpoint at the end of training (written by rank 0 alone)

With `--notebook-launcher` it starts the two processes itself, with `accelerate.notebook_launcher`, as a
notebook cell would (nothing that touches a device or imports bitsandbytes runs before the launch).
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import torch
from ppo_worker import build_trainer, leave_process_group, prompts


def digest(tensors: dict) -> str:
    """sha256 over names and bytes of the tensors: equal digests mean bit-identical weights."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def policy_digests(model) -> dict:
    from peft import get_peft_model_state_dict

    return {"policy_adapter": digest(get_peft_model_state_dict(model.pretrained_model, adapter_name="default")),
            "value_head": digest(model.v_head.state_dict())}


def train_and_report(args) -> None:
    """The body every rank runs: train on this rank's shard, then write its report and its saved policy."""
    torch.set_num_threads(1)
    trainer = build_trainer(args.base, args.reward_adapter, steps=args.steps, save_every=0)
    rank, world = trainer.accelerator.process_index, trainer.accelerator.num_processes
    every_prompt = prompts(trainer.tokenizer)  # train() hands each rank every world_size-th one
    shard = every_prompt[rank::world]
    before = policy_digests(trainer.model)

    rollouts = []  # what this rank generated and scored, step by step
    generate, rollout_forward = trainer.generate, trainer.rollout_forward

    def generate_and_record(queries, **kwargs):
        responses = generate(queries, **kwargs)
        rollouts.append({"queries": [q.tolist() for q in queries], "responses": [r.tolist() for r in responses]})
        return responses

    def rollout_and_record(batch, with_reward=False):  # train() scores inside its rollout forward
        rollout = rollout_forward(batch, with_reward=with_reward)
        if with_reward:
            rollouts[-1]["score_mean"] = rollout.scores.mean().item()
        return rollout

    trainer.generate, trainer.rollout_forward = generate_and_record, rollout_and_record
    trainer.train(every_prompt, output_dir=args.out / "run", progress=False)

    trainer.model.save_pretrained(args.out / f"rank{rank}")
    report = {
        "rank": rank, "world_size": world, "policy_wrapper": type(trainer.policy).__name__,
        "shard": [q.tolist() for q in shard], "rollouts": rollouts,
        "history": [{k: v for k, v in entry.items() if not k.startswith("time/")} for entry in trainer.history],
        "before": before, "after": policy_digests(trainer.model),
    }
    (args.out / f"rank{rank}.json").write_text(json.dumps(report))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base")
    parser.add_argument("reward_adapter")
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--notebook-launcher", action="store_true", help="start 2 processes with notebook_launcher")
    args = parser.parse_args(argv)
    if args.notebook_launcher:
        import socket

        from accelerate import notebook_launcher

        with socket.socket() as probe:  # a free port: 29500 may be taken by another run on this machine
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        notebook_launcher(train_and_report, args=(args,), num_processes=2, use_port=str(port))
    else:
        train_and_report(args)


if __name__ == "__main__":
    main()
    leave_process_group()
