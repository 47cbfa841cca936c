"""One PPO step on fixed rollouts: 2 gloo processes, each with half of them, must equal 1 process with all.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/support/dist_union_worker.py BASE RM OUT
    python tests/support/dist_union_worker.py BASE RM OUT --union

Rank r takes rollouts[r::2] with its own scale of scores; `--union` runs one process on all of them, rank 0's
rows first. With advantages whitened over the tokens of ALL processes and losses averaged over the tokens of
all processes, the gradients, and so the weights after the step, are the same. Writes OUT/weights.pt (rank 0)
and OUT/stats.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from ppo_worker import build_trainer, leave_process_group


def rollouts(tokenizer):
    texts = [("the movie", "was great and fun"), ("i loved this", "movie a lot"), ("bad", "plot"),
             ("a wonderful", "film with great music"), ("the plot", "was boring and dull"), ("it was", "fun")]
    ids = lambda t: torch.tensor(tokenizer(t, add_special_tokens=False)["input_ids"])  # noqa: E731
    queries, responses = [ids(q) for q, _ in texts], [ids(r) for _, r in texts]
    scores = torch.tensor([2.0, -1.0, 3.0, 0.05, -0.1, 0.02])  # rank 0 gets big scores, rank 1 small ones
    return queries, responses, scores


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("base")
    parser.add_argument("reward_adapter")
    parser.add_argument("out", type=Path)
    parser.add_argument("--union", action="store_true", help="one process on the rollouts of both ranks")
    parser.add_argument("--critic", default="head", choices=["head", "adapter"])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    half = 3
    size = 2 * half if args.union else half
    trainer = build_trainer(args.base, args.reward_adapter, batch_size=size, mini_batch_size=size, ppo_epochs=2,
                            init_kl_coef=0.1, whiten_rewards=True, model_kwargs={"critic": args.critic})
    queries, responses, scores = rollouts(trainer.tokenizer)
    rank, world = trainer.accelerator.process_index, trainer.accelerator.num_processes
    if args.union:
        rows = [0, 2, 4, 1, 3, 5]  # rank 0's rows, then rank 1's
    else:
        rows = list(range(rank, len(queries), world))
    stats = trainer.step([queries[i] for i in rows], [responses[i] for i in rows], scores[rows])
    if rank == 0:
        args.out.mkdir(parents=True, exist_ok=True)
        torch.save({n: p.detach().cpu() for n, p in trainer.model.named_parameters() if p.requires_grad},
                   args.out / "weights.pt")
        (args.out / "stats.json").write_text(json.dumps(stats))


if __name__ == "__main__":
    main()
    leave_process_group()
