"""Fault tolerance: a PPO run killed with SIGKILL resumes to the result of an uninterrupted run, and an
interrupted save of any stage leaves no partial folder behind.

The killed runs are real processes (`tests/support/ppo_worker.py`), killed where a learner's kernel dies: at a
seeded random moment ($MARL_KILL_SEED, default 0), and in the middle of a checkpoint write.
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import ppo_worker
from stand_ins import make_reward_adapter, make_tiny_llama

from marl_utils.ppo.checkpoint import latest_checkpoint, load_checkpoint
from marl_utils.model.multi_adapter_model import AutoModelForCausalLMWithValueHead
from marl_utils.infra.profiles import PROFILES

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
WORKER = Path(__file__).resolve().parents[1] / "support" / "ppo_worker.py"
STEPS = 6
KILL_SEED = int(os.environ.get("MARL_KILL_SEED", "0"))


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    root = tmp_path_factory.mktemp("fault_stand_ins")
    base = make_tiny_llama(root / "base")
    return base, make_reward_adapter(base, root / "reward_adapter")


@pytest.fixture(scope="module")
def straight(stand_ins):
    """The same run, never interrupted: where every killed-and-resumed run must end."""
    trainer = ppo_worker.build_trainer(*stand_ins, steps=STEPS)
    trainer.train(ppo_worker.prompts(trainer.tokenizer), progress=False)
    return trainer


def start_worker(stand_ins, out, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, str(WORKER), str(stand_ins[0]), str(stand_ins[1]), str(out), "--steps", str(STEPS),
           "--save-every", "1", *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for(condition, proc, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the worker ended (rc {proc.returncode}) before the test could kill it:\n"
                                 f"{proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("the worker made no progress")
        time.sleep(0.005)


def sigkill(proc) -> None:
    os.kill(proc.pid, signal.SIGKILL)  # no handler, no finally block, no atexit: like a dying kernel
    proc.wait(timeout=30)
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL, "the run must die mid-way, not finish"


def no_time(history):
    return [{k: v for k, v in entry.items() if not k.startswith("time/")} for entry in history]


def assert_resumes_to_the_straight_run(stand_ins, out, straight):
    trainer = ppo_worker.build_trainer(*stand_ins, steps=STEPS)
    trainer.train(ppo_worker.prompts(trainer.tokenizer), output_dir=out, resume=True, progress=False)
    assert trainer.step_count == STEPS and len(trainer.history) == STEPS
    assert no_time(trainer.history) == no_time(straight.history)
    expected = dict(straight.model.named_parameters())
    for name, param in trainer.model.named_parameters():
        assert torch.equal(param, expected[name]), name

    checkpoints = out / "checkpoints"
    assert latest_checkpoint(out) == checkpoints / f"step-{STEPS:06d}"
    assert not [p.name for p in checkpoints.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    reloaded = AutoModelForCausalLMWithValueHead.from_pretrained(str(checkpoints / f"step-{STEPS:06d}" / "model"))
    for mine, saved in zip(trainer.model.trainable_parameters(), reloaded.trainable_parameters()):
        assert torch.equal(mine, saved)
    again = ppo_worker.build_trainer(*stand_ins, steps=STEPS)
    load_checkpoint(again, out)
    assert again.step_count == STEPS


def test_sigkill_at_a_random_moment_then_resume(stand_ins, straight, tmp_path):
    rng = random.Random(KILL_SEED)
    after, delay = rng.randint(1, 3), rng.uniform(0.0, 0.4)
    # 0.25 s after each step: at least three steps (0.75 s) are left when the kill comes, whatever `delay` is
    proc = start_worker(stand_ins, tmp_path, "--pause", "0.25")
    wait_for((tmp_path / "checkpoints" / f"step-{after:06d}" / "checkpoint.json").exists, proc)
    time.sleep(delay)
    sigkill(proc)
    killed_at = int(latest_checkpoint(tmp_path).name.split("-")[1])
    assert after <= killed_at < STEPS, f"seed {KILL_SEED}: killed {delay:.2f}s after checkpoint {after}"
    assert_resumes_to_the_straight_run(stand_ins, tmp_path, straight)


def test_sigkill_during_a_checkpoint_write_keeps_the_previous_one(stand_ins, straight, tmp_path):
    marker = tmp_path / "stalled"
    out = tmp_path / "run"
    proc = start_worker(stand_ins, out, "--stall-in-save", "3", "--marker", str(marker))
    wait_for(marker.exists, proc)
    sigkill(proc)
    checkpoints = out / "checkpoints"
    half_written = [p for p in checkpoints.iterdir() if p.name.startswith(".step-000003.tmp-")]
    assert half_written and (half_written[0] / "trainer_state.pt").exists(), "killed inside the write of step 3"
    assert (checkpoints / "latest").read_text().strip() == "step-000002"
    assert latest_checkpoint(out) == checkpoints / "step-000002"
    assert_resumes_to_the_straight_run(stand_ins, out, straight)


# ---------------------------------------------------------------------------------------------- stage folders
QUICK = PROFILES["tiny"].replace(**ppo_worker.QUICK_SIZES)


def leftovers(out: Path) -> list[str]:
    """Hidden temporary folders/files that an interrupted atomic write would leave."""
    return [p.name for p in out.iterdir() if p.name.startswith(".")]


def interrupt_after(cls, method: str, monkeypatch, when=lambda path: True):
    """Let `cls.method` write its files, then raise KeyboardInterrupt (Ctrl-C in the middle of a stage's save)."""
    real = getattr(cls, method)

    def save_then_interrupt(self, path, *args, **kwargs):
        real(self, path, *args, **kwargs)
        if when(Path(path)):
            raise KeyboardInterrupt

    monkeypatch.setattr(cls, method, save_then_interrupt)


@pytest.fixture(scope="module")
def stages_done(tmp_path_factory):
    """A run folder with the tiny base and stages 1-2 done at QUICK sizes; tests copy what they need from it."""
    from marl_utils.stages.reward import train_reward_adapter
    from marl_utils.stages.sft import train_sft

    out = tmp_path_factory.mktemp("stages")
    train_sft(QUICK, out, progress=False)
    train_reward_adapter(QUICK, out, progress=False)
    return out


def copy_run(done: Path, out: Path, *stages) -> Path:
    out.mkdir()
    shutil.copy(done / "run.json", out / "run.json")
    for stage in stages:
        shutil.copytree(done / stage, out / stage)
    if "reward_adapter" in stages:  # as if trained here: the adapter records the stage-1 folder it was trained on
        config = json.loads((out / "reward_adapter" / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = str((out / "sft").resolve())
        (out / "reward_adapter" / "adapter_config.json").write_text(json.dumps(config))
    return out


def test_interrupted_sft_save_leaves_no_sft_folder(stages_done, tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    from marl_utils.stages.sft import train_sft

    out = copy_run(stages_done, tmp_path / "out", "base")  # the tiny base is not rebuilt
    interrupt_after(PreTrainedModel, "save_pretrained", monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        train_sft(QUICK, out, progress=False)
    assert not (out / "sft").exists() and leftovers(out) == []


def test_interrupted_reward_save_leaves_no_reward_folder(stages_done, tmp_path, monkeypatch):
    from peft import PeftModel

    from marl_utils.stages.reward import train_reward_adapter

    out = copy_run(stages_done, tmp_path / "out", "sft")
    interrupt_after(PeftModel, "save_pretrained", monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        train_reward_adapter(QUICK, out, progress=False)
    assert not (out / "reward_adapter").exists() and leftovers(out) == []


def test_interrupted_ppo_save_leaves_no_ppo_folder(stages_done, tmp_path, monkeypatch):
    from marl_utils.stages.ppo import train_ppo

    out = copy_run(stages_done, tmp_path / "out", "sft", "reward_adapter")
    # the stage folder's save, not a PPO checkpoint's (those go to OUT/ppo_checkpoints/)
    interrupt_after(AutoModelForCausalLMWithValueHead, "save_pretrained", monkeypatch,
                    when=lambda path: path.name.startswith(".ppo.tmp-"))
    with pytest.raises(KeyboardInterrupt):
        train_ppo(QUICK, out, progress=False)
    assert not (out / "ppo").exists() and leftovers(out) == []
    assert latest_checkpoint(out / "ppo_checkpoints").name == f"step-{QUICK.ppo_steps:06d}"  # the run was saved


def test_marl_ppo_killed_then_resumed_with_the_command(stages_done, tmp_path, monkeypatch, capsys):
    """`marl ppo` killed after its second checkpoint; `marl ppo --resume` ends where an unbroken run ends."""
    from marl_utils.cli import main

    killed = copy_run(stages_done, tmp_path / "killed", "sft", "reward_adapter")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([sys.executable, str(WORKER), "marl", "--pause", "0.25", "--", "ppo", "--profile", "tiny",
                             "--output-dir", str(killed)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    second = QUICK.ppo_save_every * 2
    wait_for((killed / "ppo_checkpoints" / "checkpoints" / f"step-{second:06d}" / "checkpoint.json").exists, proc)
    sigkill(proc)
    assert not (killed / "ppo").exists()

    monkeypatch.setitem(PROFILES, "tiny", QUICK)
    straight = copy_run(stages_done, tmp_path / "straight", "sft", "reward_adapter")
    assert main(["ppo", "--profile", "tiny", "--output-dir", str(straight)]) == 0
    assert main(["ppo", "--profile", "tiny", "--output-dir", str(killed), "--resume"]) == 0
    assert "no checkpoint under" not in capsys.readouterr().out
    expected, resumed = (json.loads((out / "ppo" / "metrics.json").read_text()) for out in (straight, killed))
    assert resumed["steps"] == expected["steps"] == QUICK.ppo_steps
    assert no_time(resumed["history"]) == no_time(expected["history"])
    for key in ["eval_reward_before", "eval_reward_after", "kl_final", "samples_after"]:
        assert resumed[key] == expected[key], key


def test_interrupted_plot_keeps_the_previous_png(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from marl_utils.display.plots import plot_curves

    png = tmp_path / "plots" / "ppo.png"
    plot_curves([{"reward": 0.0}, {"reward": 1.0}], ["reward"], save_to=png)
    before = png.read_bytes()
    interrupt_after(Figure, "savefig", monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        plot_curves([{"reward": 5.0}], ["reward"], save_to=png)
    assert png.read_bytes() == before and leftovers(png.parent) == []
