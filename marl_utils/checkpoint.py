"""PPO checkpoints that survive Ctrl-C: everything needed to continue a run exactly (notebook 03).

Layout of one checkpoint, `OUT/checkpoints/step-000010/`:

    model/               model.save_pretrained: policy adapter(s) (peft format) + value heads; loadable
                         on its own with AutoModelForCausalLMWithValueHead.from_pretrained
    trainer_state.pt     optimizer, fp16 GradScaler, KL controller, score statistics, step counter, history,
                         RNG states of every process
    checkpoint.json      format marker, step, adapter names, the PPOConfig and a fingerprint of the prompts
                         the run trained on (read first, so a foreign folder fails fast)

The folder is written into a temporary sibling and renamed into place (`atomic_dir`); only then is
`OUT/checkpoints/latest` rewritten (atomically) to name it. An interrupted save therefore leaves the
previous checkpoint and the pointer as they were. Loading reads and checks every file before it
changes anything in the trainer.

Resuming is exact or refused: a checkpoint continues only under the settings it ran with (every PPOConfig
field that changes the maths, and the same prompt set); `steps`, evaluation, saving and logging may differ.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from .atomic import atomic_dir, atomic_write_text
from .errors import MarlInputError

FORMAT = "marl_utils.ppo_checkpoint"
VERSION = 1
INFO_FILE, STATE_FILE, MODEL_DIR, LATEST = "checkpoint.json", "trainer_state.pt", "model", "latest"
# PPOConfig fields a resumed run may change: they decide how long, how often and where, not what is computed
RESUMABLE_CHANGES = {"steps", "eval_every", "save_every", "log_with", "logging_dir"}


def prompts_fingerprint(prompts) -> str:
    """sha256 over the token ids of the whole prompt set, in order: the same prompts give the same string."""
    digest = hashlib.sha256()
    for prompt in prompts:
        digest.update(prompt.detach().cpu().to(torch.int64).numpy().tobytes())
        digest.update(b"|")
    return digest.hexdigest()


def _rng_state(trainer) -> dict:
    """This process's RNG streams, as tensors and plain types (loadable with weights_only=True)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                    cached),
             "torch": torch.get_rng_state(), "prompt_generator": trainer.prompt_generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(trainer, state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    trainer.prompt_generator.set_state(state["prompt_generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(trainer, checkpoints_dir) -> Path:
    """Write `checkpoints_dir/step-NNNNNN` atomically, then point `checkpoints_dir/latest` at it."""
    from accelerate.utils import gather_object

    accelerator = trainer.accelerator
    root = Path(checkpoints_dir)
    final = root / f"step-{trainer.step_count:06d}"
    rng_states = gather_object([_rng_state(trainer)]) if accelerator.num_processes > 1 else [_rng_state(trainer)]
    if accelerator.is_main_process:
        state = {
            "format": FORMAT, "version": VERSION, "step_count": trainer.step_count, "history": trainer.history,
            "optimizer": trainer.optimizer.state_dict(), "scaler": trainer.stepper.scaler_state(),
            "kl_ctl": trainer.kl_ctl.state_dict(),
            "score_moments": trainer.score_moments.state_dict(),
            "config": trainer.config.to_dict(), "rng": rng_states,
        }
        info = {"format": FORMAT, "version": VERSION, "step": trainer.step_count,
                "policy_adapter_name": trainer.policy_adapter_name,
                "policy_adapter_names": list(trainer.model.policy_adapter_names),
                "critic_adapter_names": dict(trainer.model.critic_adapter_names),
                "num_processes": accelerator.num_processes, "config": trainer.config.to_dict(),
                "prompts_fingerprint": getattr(trainer, "prompts_digest", None)}
        for stray in [*root.glob(f".{final.name}.tmp-*"), *root.glob(f".{final.name}.old-*")]:
            shutil.rmtree(stray, ignore_errors=True)  # left by a process killed while it saved this same step
        with atomic_dir(final) as tmp:
            trainer.model.save_pretrained(tmp / MODEL_DIR)
            torch.save(state, tmp / STATE_FILE)
            (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        atomic_write_text(root / LATEST, final.name + "\n")
    accelerator.wait_for_everyone()
    return final


def _is_checkpoint(folder: Path) -> bool:
    return (folder / INFO_FILE).is_file()


def latest_checkpoint(path) -> Path | None:
    """The newest complete checkpoint under `path` (a step-* folder, a checkpoints/ folder or a run's output_dir).

    Follows the `latest` pointer; if it is missing or names a folder that is gone, takes the highest step-*.
    """
    path = Path(path)
    if _is_checkpoint(path):
        return path
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    pointer = root / LATEST
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if _is_checkpoint(named):
            return named
    found = sorted(p for p in root.glob("step-*") if _is_checkpoint(p))
    return found[-1] if found else None


def _read_checkpoint(folder: Path, trainer):
    """Read and check every file of a checkpoint; raises MarlInputError, changes nothing."""
    from safetensors.torch import load_file

    try:
        info = json.loads((folder / INFO_FILE).read_text())
    except (OSError, ValueError) as err:
        raise MarlInputError(f"{folder / INFO_FILE} cannot be read ({err}); this checkpoint is damaged: delete "
                             f"{folder} and resume from an earlier one") from err
    if info.get("format") != FORMAT:
        raise MarlInputError(f"{folder} is not a marl_utils PPO checkpoint (format {info.get('format')!r}); pass a "
                             "folder written by PPOTrainer.save_checkpoint or train(output_dir=...)")
    if info.get("version") != VERSION:
        raise MarlInputError(f"{folder} is a version {info.get('version')} checkpoint; this marl_utils reads {VERSION}")
    check_same_run(folder, info, trainer)
    missing = [n for n in info["policy_adapter_names"] if n not in trainer.model.policy_adapter_names]
    if missing:
        raise MarlInputError(f"{folder} holds policy adapters {missing} that this model lacks "
                             f"({trainer.model.policy_adapter_names}); build the model with the same adapters")
    critics = info.get("critic_adapter_names", {})
    if critics != {n: c for n, c in trainer.model.critic_adapter_names.items() if n in critics} or (
            not critics and trainer.model.critic_adapter_names):
        raise MarlInputError(f"{folder} was written with critic={'adapter' if critics else 'head'}, this model has "
                             f"critic={trainer.model.critic!r}; resume with the same critic choice")
    try:
        state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
        model_dir = folder / MODEL_DIR
        adapters = {name: load_file(str((model_dir if name == "default" else model_dir / name)
                                        / "adapter_model.safetensors"))
                    for name in [*info["policy_adapter_names"], *critics.values()]}
        heads = load_file(str(model_dir / "value_heads.safetensors"))
    except Exception as err:  # a truncated or overwritten file: torch, safetensors and OS errors alike
        raise MarlInputError(f"checkpoint {folder} is corrupt or incomplete ({type(err).__name__}: {err}); delete "
                             "it and resume from an earlier one") from err
    if state.get("format") != FORMAT or state.get("step_count") != info["step"]:
        raise MarlInputError(f"{folder / STATE_FILE} does not belong to {folder / INFO_FILE}; the checkpoint is "
                             "inconsistent: delete it and resume from an earlier one")
    _check_fits(folder, trainer, info, adapters, heads)
    return info, state, adapters, heads


def check_same_run(folder: Path, info: dict, trainer) -> None:
    """The settings and prompts of the run that wrote `folder` are this trainer's, or a clear error."""
    saved = info.get("config") or {}
    mine = trainer.config.to_dict()
    changed = [f"{k}: {saved[k]!r} in the checkpoint, {mine[k]!r} now" for k in sorted(set(saved) & set(mine))
               if k not in RESUMABLE_CHANGES and saved[k] != mine[k]]
    if changed:
        listed = "; ".join(changed[:3]) + (f"; ... ({len(changed)} in all)" if len(changed) > 3 else "")
        raise MarlInputError(f"checkpoint {folder} ran with other PPO settings ({listed}); a resumed run continues "
                             "exactly or not at all: resume with the settings it was written with (only steps, "
                             "eval_every, save_every and logging may change), or start a new run in another folder")
    theirs, ours = info.get("prompts_fingerprint"), getattr(trainer, "prompts_digest", None)
    if theirs and ours and theirs != ours:
        raise MarlInputError(f"checkpoint {folder} trained on another prompt set than the one passed to train() "
                             "(their fingerprints differ); resume with the same prompts (same dataset, seed and "
                             "sizes), or start a new run in another folder")


def _check_fits(folder: Path, trainer, info: dict, adapters: dict, heads: dict) -> None:
    """Same trained adapter, same LoRA tensors and value heads as this model, or an error before anything loads.

    peft and torch load matching tensors one by one and only then complain, so a checkpoint of another LoRA
    config (other target modules, rank) would leave the model half overwritten; hence compare first.
    """
    from peft import get_peft_model_state_dict

    if info.get("policy_adapter_name") != trainer.policy_adapter_name:
        raise MarlInputError(f"{folder} trained the policy adapter {info.get('policy_adapter_name')!r}, this trainer "
                             f"trains {trainer.policy_adapter_name!r}; its optimizer state belongs to the other one. "
                             "Resume with the same adapter active (model.set_policy_adapter)")
    model = trainer.model
    expected = {name: get_peft_model_state_dict(model.pretrained_model, adapter_name=name) for name in adapters}
    expected["value heads"] = model.v_heads.state_dict()
    short = lambda key: key.removeprefix("base_model.model.")  # noqa: E731 - peft's prefix on every key
    problems = []
    for name, saved in [*adapters.items(), ("value heads", heads)]:
        mine = expected[name]
        if name != "value heads":  # the model may carry value heads of adapters the checkpoint does not hold
            problems += [f"{name}: {short(k)} is missing from the checkpoint" for k in sorted(set(mine) - set(saved))]
        problems += [f"{name}: {short(k)} is not in this model" for k in sorted(set(saved) - set(mine))]
        problems += [f"{name}: {short(k)} is {list(saved[k].shape)} there, {list(mine[k].shape)} here"
                     for k in sorted(set(saved) & set(mine)) if saved[k].shape != mine[k].shape]
    if problems:
        listed = "; ".join(problems[:2]) + (f"; ... ({len(problems)} in all)" if len(problems) > 2 else "")
        raise MarlInputError(f"checkpoint {folder} does not fit this model ({listed}); resume with the same base "
                             "model and LoRA config (r, target_modules) that wrote it")


def load_checkpoint(trainer, path) -> Path:
    """Restore model weights, optimizer, KL controller, step counter, history and RNG states from `path`."""
    from peft import set_peft_model_state_dict

    folder = latest_checkpoint(path)
    if folder is None:
        raise MarlInputError(f"no PPO checkpoint under {path}: expected step-NNNNNN folders with {INFO_FILE}")
    info, state, adapters, heads = _read_checkpoint(folder, trainer)
    model = trainer.model
    try:
        with torch.no_grad():
            for name, weights in adapters.items():
                result = set_peft_model_state_dict(model.pretrained_model, weights, adapter_name=name)
                if getattr(result, "unexpected_keys", None):
                    raise ValueError(f"unexpected adapter weights {result.unexpected_keys[:3]}")
            model.v_heads.load_state_dict({k: v.to(model.device) for k, v in heads.items()}, strict=False)
        trainer.optimizer.load_state_dict(state["optimizer"])
        trainer.stepper.load_scaler_state(state.get("scaler"))
    except (RuntimeError, ValueError, KeyError) as err:
        raise MarlInputError(f"checkpoint {folder} does not fit this model/optimizer ({err}); resume with the same "
                             "base model, LoRA config and optimizer that wrote it") from err
    trainer.kl_ctl.load_state_dict(state["kl_ctl"])
    trainer.score_moments.load_state_dict(state["score_moments"])
    trainer.step_count = state["step_count"]
    trainer.history = list(state["history"])
    rank, world = trainer.accelerator.process_index, trainer.accelerator.num_processes
    if len(state["rng"]) == world:
        _set_rng_state(trainer, state["rng"][rank])
    else:
        import warnings

        warnings.warn(f"{folder} was written by {len(state['rng'])} processes, this run has {world}: RNG streams "
                      "restart from the seed, so the continuation is not bit-identical")
    return folder
