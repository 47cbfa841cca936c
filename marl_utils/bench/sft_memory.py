"""Memory of PPO against SFT at the same base size: the Hydra-RLHF comparison (issue 21, item 4).

Hydra-RLHF (Santacroce et al. 2023) reports that LoRA-PPO on one shared base needs less memory than full
fine-tuning (SFT), while PPO on separate models needs more than 3x SFT. This measures our three:

    sft_fp32        stage 1 as `marl sft` runs it: TRL's SFTTrainer, every weight trained with AdamW
                    (weights + gradients + two Adam moments = 4x the weights, plus activations)
    marl_fp32       one PPO step on one base: policy LoRA + value head, reference = adapters off,
                    reward = reward LoRA + score head (bench_layouts.MarlLayout)
    separate_fp32   one PPO step on four networks: policy copy + LoRA, reference copy, merged reward
                    classifier, value model copy with a trained head only (bench_layouts.SeparateLayout)

Each in a fresh process (`python -m marl_utils.bench.sft_memory --sft ...`; the PPO layouts through
bench_memory's own process), on the random-init bench base of the chosen size, so its peak resident set is
its own. "model RSS" is the peak minus the process's resident set after its imports (code is not memory
the method needs). Our separate layout trains LoRA and a value head only; Hydra-RLHF's separate PPO trains
the full actor and critic, which is where their "> 3x SFT" comes from (see `format_sft_table`).

    python scripts/memory_vs_sft.py --base-size mid      # prints the table, writes OUT/bench/memory_vs_sft.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..infra.atomic import atomic_write_json
from .memory import (MB, _run_layout_process, peak_rss_bytes, reset_peak_rss, resident_bytes, return_free_heap,
                           rss_bytes)

PPO_LAYOUTS = ("marl_fp32", "separate_fp32")


def measure_sft(inputs: dict, steps: int, batch_size: int, max_length: int) -> dict:
    """Load the bench base as stage 1 does and run `steps` SFTTrainer steps; its memory figures (fresh process)."""
    import datasets
    import torch
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from trl import SFTTrainer

    from ..data.loading import load_imdb
    from ..infra.profiles import PROFILES
    from ..stages.sft import sft_config

    config = AutoConfig.from_pretrained(inputs["base"])
    MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]  # the model code imported now: the baseline holds code, no weights
    texts = load_imdb()["train"]["text"][:batch_size * steps]
    tokenizer = AutoTokenizer.from_pretrained(inputs["base"])
    baseline = rss_bytes()

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(inputs["base"], dtype=torch.float32)
    load_seconds = time.perf_counter() - start
    return_free_heap()
    after_load, load_peak = rss_bytes(), peak_rss_bytes()
    can_reset = reset_peak_rss()
    with tempfile.TemporaryDirectory(prefix="marl-sft-memory-") as work_dir:
        # stage 1's settings at this size (on the CPU: the parent hides CUDA, like the PPO layouts' processes)
        profile = dataclasses.replace(PROFILES["tiny"], sft_batch_size=batch_size, sft_max_length=max_length,
                                      sft_max_steps=steps)
        args = sft_config(profile, work_dir)
        args.disable_tqdm = True
        trainer = SFTTrainer(model=model, args=args, processing_class=tokenizer,
                             train_dataset=datasets.Dataset.from_dict({"text": texts}))
        started = time.perf_counter()
        trainer.train()
        step_seconds = (time.perf_counter() - started) / steps
        optimizer_bytes = resident_bytes_of_state(trainer.optimizer)
    peak, train_peak = max(load_peak, peak_rss_bytes()), peak_rss_bytes() if can_reset else None
    return {
        "layout": "sft_fp32", "precision": "fp32", "param_bytes": resident_bytes(model),
        "optimizer_state_bytes": optimizer_bytes,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "baseline_rss_bytes": baseline, "after_load_rss_bytes": after_load, "peak_rss_bytes": peak,
        "model_rss_bytes": peak - baseline if baseline is not None else None, "train_peak_rss_bytes": train_peak,
        "load_seconds": load_seconds, "step_seconds": step_seconds, "threads": torch.get_num_threads(),
        "sft_shape": {"batch_size": batch_size, "max_length": max_length, "steps": steps},
    }


def resident_bytes_of_state(optimizer) -> int:
    """Bytes of an optimizer's state tensors (AdamW: two moments per trained weight)."""
    import torch

    return sum(t.untyped_storage().nbytes() for state in optimizer.state.values() for t in state.values()
               if isinstance(t, torch.Tensor))


def _run_sft_process(inputs_file: Path, steps: int, batch_size: int, max_length: int, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result_file = Path(tmp) / "result.json"
        command = [sys.executable, "-m", "marl_utils.bench.sft_memory", "--sft", "--inputs", str(inputs_file),
                   "--steps", str(steps), "--batch-size", str(batch_size), "--max-length", str(max_length),
                   "--threads", str(threads), "--result", str(result_file)]
        package_root = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "CUDA_VISIBLE_DEVICES": "",
               "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0 or not result_file.exists():
            raise RuntimeError(f"SFT memory process failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
        return json.loads(result_file.read_text())


def memory_vs_sft(base_size: str = "mid", output_dir=None, sft_steps: int = 3, sft_batch_size: int | None = None,
                  sft_max_length: int | None = None, ppo_steps: int = 1, threads: int = 0) -> dict:
    """SFT, one-base PPO and separate-model PPO on the same bench base, each in its own process, one at a time.

    SFT sizes default to stage 1's (the tiny profile's batch and max length); the PPO step is the bench's
    (bench_layouts.STEP_SHAPES). Writes OUT/bench/memory_vs_sft.json and returns it.
    """
    from .layouts import BASE_SIZES, BENCH_LORA, STEP_SHAPES, prepare_bench_models
    from ..infra.errors import MarlInputError
    from ..infra.profiles import PROFILES
    from ..infra.runs import default_output_dir, prepare_run_dir

    if base_size not in BASE_SIZES:
        raise MarlInputError(f"base_size={base_size!r}: choose one of {sorted(BASE_SIZES)}")
    for name, value in (("sft_steps", sft_steps), ("ppo_steps", ppo_steps)):
        if value < 1:
            raise MarlInputError(f"{name}={value}: at least 1 step is needed to reach the training peak")
    tiny = PROFILES["tiny"]
    batch_size, max_length = sft_batch_size or tiny.sft_batch_size, sft_max_length or tiny.sft_max_length
    out = prepare_run_dir(output_dir or default_output_dir(tiny), tiny)
    shape = STEP_SHAPES[base_size]
    inputs = {**prepare_bench_models(out / "bench", base_size, BENCH_LORA, batch=shape.batch), "shape": shape.as_dict()}
    inputs_file = out / "bench" / f"inputs-{base_size}.json"
    atomic_write_json(inputs_file, inputs)
    rows = {"sft_fp32": _run_sft_process(inputs_file, sft_steps, batch_size, max_length, threads)}
    print(f"memory vs SFT: sft_fp32 done, peak RSS {rows['sft_fp32']['peak_rss_bytes'] / MB:.0f} MB", flush=True)
    for name in PPO_LAYOUTS:  # one at a time: two processes at once would share the machine's memory bandwidth only
        rows[name] = _run_layout_process(name, inputs_file, ppo_steps - 1, threads)
        print(f"memory vs SFT: {name} done, peak RSS {rows[name]['peak_rss_bytes'] / MB:.0f} MB", flush=True)
    summary = {"base_size": base_size, "base_params": inputs["base_params"], "ppo_shape": shape.as_dict(),
               "lora": BENCH_LORA, "sft_shape": rows["sft_fp32"]["sft_shape"], "layouts": rows,
               "command": f"python scripts/memory_vs_sft.py --base-size {base_size} --sft-steps {sft_steps} "
                          f"--ppo-steps {ppo_steps}"}
    atomic_write_json(out / "bench" / "memory_vs_sft.json", summary)
    return summary


def format_sft_table(summary: dict) -> str:
    """One row per run: parameter bytes, peak RSS, model RSS (peak - imports) and its ratio to SFT's."""
    rows = summary["layouts"]
    sft = rows["sft_fp32"]["model_rss_bytes"]
    head = f"{'run':<15}{'trained params':>15}{'weights MB':>11}{'peak RSS MB':>12}{'model RSS MB':>13}{'x SFT':>7}"
    lines = [head, "-" * len(head)]
    for name in ("sft_fp32",) + PPO_LAYOUTS:
        row = rows[name]
        ratio = f"{row['model_rss_bytes'] / sft:.2f}" if sft and row["model_rss_bytes"] is not None else "-"
        model_rss = f"{row['model_rss_bytes'] / MB:.0f}" if row["model_rss_bytes"] is not None else "-"
        lines.append(f"{name:<15}{row['trainable_params']:>15,}{row['param_bytes'] / MB:>11.1f}"
                     f"{row['peak_rss_bytes'] / MB:>12.0f}{model_rss:>13}{ratio:>7}")
    shape, ppo = summary["sft_shape"], summary["ppo_shape"]
    lines.append(f"base '{summary['base_size']}' ({summary['base_params'] / 1e6:.1f}M params, random weights), "
                 f"float32, CPU resident set (MB = 1e6 bytes); model RSS = peak - the process's RSS after imports")
    lines.append(f"SFT: TRL SFTTrainer, AdamW, batch {shape['batch_size']} x <= {shape['max_length']} tokens; "
                 f"PPO: batch {ppo['batch']}, {ppo['new_tokens']} new tokens, {ppo['ppo_epochs']} epochs x "
                 f"{ppo['minibatches']} minibatches, LoRA r{summary['lora']['r']} on every linear layer")
    return "\n".join(lines)


def _main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m marl_utils.bench.sft_memory",
                                     description="memory of PPO (one base, separate models) against SFT")
    parser.add_argument("--sft", action="store_true", help="internal: measure SFT in this process")
    parser.add_argument("--inputs", help="internal: the json prepare_bench_models' folders were written to")
    parser.add_argument("--result", help="internal: where to write the SFT figures")
    parser.add_argument("--base-size", default="mid", choices=["tiny", "mid", "large", "gpt2"])
    parser.add_argument("--output-dir", default=None, help="run folder (default: runs/tiny); bench models go in it")
    parser.add_argument("--steps", "--sft-steps", dest="steps", type=int, default=3, help="SFT steps")
    parser.add_argument("--ppo-steps", type=int, default=1, help="PPO steps per layout")
    parser.add_argument("--batch-size", type=int, default=None, help="SFT batch (default: stage 1's)")
    parser.add_argument("--max-length", type=int, default=None, help="SFT max tokens (default: stage 1's)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.sft:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        inputs = json.loads(Path(args.inputs).read_text())
        atomic_write_json(args.result, measure_sft(inputs, args.steps, args.batch_size, args.max_length))
        return 0
    summary = memory_vs_sft(args.base_size, args.output_dir, sft_steps=args.steps, sft_batch_size=args.batch_size,
                            sft_max_length=args.max_length, ppo_steps=args.ppo_steps, threads=args.threads)
    print(format_sft_table(summary))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
