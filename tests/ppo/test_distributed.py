"""Data-parallel PPO: the same PPOTrainer under `torchrun --nproc_per_node 2` on CPU (gloo).

Each rank generates on its own shard of the prompts, gradients are averaged (so the replicas stay
bit-identical although they trained on different rollouts), statistics are averaged over ranks, and rank 0
alone writes the checkpoint. The worker is `tests/support/dist_ppo_worker.py`.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file
from stand_ins import make_reward_adapter, make_tiny_llama

from marl_utils.ppo.checkpoint import latest_checkpoint

WORKER = Path(__file__).resolve().parents[1] / "support" / "dist_ppo_worker.py"
STEPS = 3


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    """Built once, before any launch: the processes only read them."""
    root = tmp_path_factory.mktemp("ddp_stand_ins")
    base = make_tiny_llama(root / "base")
    return base, make_reward_adapter(base, root / "reward_adapter")


def launch(cmd, out):
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return out, [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.fixture(scope="module")
def ranks(stand_ins, tmp_path_factory):
    """torchrun with 2 processes on the worker; returns (out, [rank0 report, rank1 report])."""
    out = tmp_path_factory.mktemp("ddp_out")
    return launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   str(WORKER), *map(str, stand_ins), str(out), "--steps", str(STEPS)], out)


def test_two_ranks_with_ddp(ranks):
    _, (rank0, rank1) = ranks
    assert (rank0["rank"], rank1["rank"]) == (0, 1)
    assert rank0["world_size"] == 2 and rank0["policy_wrapper"] == "DistributedDataParallel"


def test_each_rank_generates_on_its_own_shard(ranks):
    _, reports = ranks
    shards = [{tuple(q) for q in r["shard"]} for r in reports]
    assert shards[0] and not shards[0] & shards[1]
    for report, shard in zip(reports, shards):
        assert len(report["rollouts"]) == STEPS
        assert all({tuple(q) for q in step["queries"]} == shard for step in report["rollouts"])
    assert reports[0]["rollouts"][0]["responses"] != reports[1]["rollouts"][0]["responses"]


def test_statistics_are_averaged_over_ranks(ranks):
    _, (rank0, rank1) = ranks
    assert rank0["history"] == rank1["history"] and [h["step"] for h in rank0["history"]] == [1, 2, 3]
    for entry, local0, local1 in zip(rank0["history"], rank0["rollouts"], rank1["rollouts"]):
        assert local0["score_mean"] != local1["score_mean"]
        assert entry["env/score_mean"] == pytest.approx((local0["score_mean"] + local1["score_mean"]) / 2, abs=1e-6)


def test_policy_adapter_and_value_head_identical_on_every_rank_and_trained(ranks):
    out, (rank0, rank1) = ranks
    assert rank0["before"] == rank1["before"]
    assert rank0["after"] == rank1["after"]  # different rollouts, same weights: gradients were averaged
    assert rank0["after"]["policy_adapter"] != rank0["before"]["policy_adapter"]
    assert rank0["after"]["value_head"] != rank0["before"]["value_head"]

    checkpoint = latest_checkpoint(out / "run")
    assert checkpoint.name == f"step-{STEPS:06d}"
    assert json.loads((checkpoint / "checkpoint.json").read_text())["num_processes"] == 2
    for name in ["adapter_model.safetensors", "value_heads.safetensors"]:
        saved = [load_file(folder / name) for folder in (out / "rank0", out / "rank1", checkpoint / "model")]
        assert saved[0].keys() == saved[1].keys() == saved[2].keys() and saved[0]
        for key in saved[0]:
            assert saved[0][key].equal(saved[1][key]) and saved[0][key].equal(saved[2][key]), key


def test_marl_ppo_command_under_torchrun(tmp_path):
    """What the README tells a multi-GPU user to run, stages 1-2 done: `torchrun ... -m marl_utils ppo`.

    Stand-ins take the place of the stage-1 model and stage-2 adapter; the tiny profile's own PPO sizes run.
    """
    out = tmp_path / "out"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"profile": "tiny"}))
    make_reward_adapter(make_tiny_llama(out / "sft"), out / "reward_adapter")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "marl_utils",
           "ppo", "--profile", "tiny", "--output-dir", str(out), "--steps", "2"]
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.count("stage 3 (PPO) done") == 1  # one process writes the stage folder
    metrics = json.loads((out / "ppo" / "metrics.json").read_text())
    assert metrics["steps"] == 2 and len(metrics["history"]) == 2
    checkpoint = latest_checkpoint(out / "ppo_checkpoints")
    assert json.loads((checkpoint / "checkpoint.json").read_text())["num_processes"] == 2
    final, saved = (load_file(folder / "adapter_model.safetensors") for folder in (out / "ppo", checkpoint / "model"))
    assert final.keys() == saved.keys() and all(final[k].equal(saved[k]) for k in final)
    assert sorted(p.name for p in out.iterdir()) == ["ppo", "ppo_checkpoints", "reward_adapter", "run.json", "sft"]


def test_notebook_launcher_runs_the_same_data_parallel_training(stand_ins, tmp_path):
    """What a notebook with several devices does: `notebook_launcher(train_fn, num_processes=2)` (here on CPU)."""
    _, (rank0, rank1) = launch([sys.executable, str(WORKER), *map(str, stand_ins), str(tmp_path), "--steps", "2",
                                "--notebook-launcher"], tmp_path)
    assert rank0["world_size"] == 2 and rank0["policy_wrapper"] == "DistributedDataParallel"
    assert rank0["rollouts"][0]["responses"] != rank1["rollouts"][0]["responses"]
    assert rank0["after"] == rank1["after"] and rank0["after"] != rank0["before"]


def test_leave_process_group_ends_the_group_and_is_a_no_op_without_one(tmp_path):
    import torch.distributed as dist

    from marl_utils.ppo.accelerator import leave_process_group

    leave_process_group()   # one process, no group: nothing to do
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        leave_process_group()
        assert not dist.is_initialized()   # what `marl` does at the end of a torchrun job
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
