"""`marl bench`: time as ratios to a compute floor, and memory, of one shared base (MARL) vs separate models.

    marl bench [--profile P] [--base-size tiny|mid|large|gpt2] [--precision fp32|bf16] [--device cpu|cuda]
               [--steps 5] [--time-budget S] [--timing-only] [--profile-step] [--output-dir OUT]

Two parts (docs/performance.md), on a random-init base of `--base-size` and the PPO step of
`bench_layouts.STEP_SHAPES` (mid: batch 32, 20 new tokens, 4 epochs x 4 minibatches, LoRA r8 on all linear
layers):

1. Time, in THIS process (`bench_ratio.py`): the compute floor (`bench_floor.py`, plain torch + peft), the
   project's PPOTrainer on the MARL model, the separate-models layout and the critic adapter (once it
   exists), interleaved step by step; medians per phase and the ratios ours / floor.
2. Memory, CPU and fp32 compute only (skipped otherwise; `bench_memory.py`): each layout x weight precision in
   its OWN process (`python -m marl_utils.bench.memory --layout ...`), so its peak resident set is its own:
   - param_bytes: the bytes its modules hold (parameters, buffers, bitsandbytes scales), shared storage once;
   - baseline_rss_bytes: its resident set right after the imports (torch + transformers + peft), before any
     model; peak_rss_bytes: its peak over its whole life; model RSS = peak - baseline;
   - train_peak_rss_bytes: the peak during its PPO steps alone. Loading on a CPU has its own transient (the
     quantized layouts read and quantize the float32 checkpoint), which only the whole-life peak holds; the
     heap that loading frees is handed back to the OS first (glibc `malloc_trim`), the same in every layout.

`--profile-step` adds the op-by-op profile of one training minibatch, ours vs the floor (`bench_profile.py`).
Results go to `OUT/bench.json` (every figure) and `OUT/plots/bench.png` (the ratios, and memory); a table is
printed.
"""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
from pathlib import Path

from ..infra.atomic import atomic_write_json
from .memory import (DEFAULT_LAYOUTS, LAYOUTS, format_memory_table, measure_memory, peak_rss_bytes,
                           plot_memory, reset_peak_rss, rss_bytes, summarise)
from ..infra.errors import MarlInputError

__all__ = ["run_bench", "format_table", "summarise", "LAYOUTS", "DEFAULT_LAYOUTS", "peak_rss_bytes",
           "reset_peak_rss", "rss_bytes"]

PRECISIONS = ("fp32", "bf16")
DEVICES = ("cpu", "cuda")
PHASES = {
    "generate": "sample new_tokens per prompt with the policy (no grad)",
    "score": "the reward adapter's (or reward model's) score of each rollout (no grad)",
    "rollout": "policy logprobs + values and reference logprobs over the rollouts (no grad), rewards, GAE",
    "optimise": "ppo_epochs x minibatches: forward with grad, clipped policy + value loss, backward, Adam step",
    "total": "the whole step by the clock (for the trainer also input checks and statistics: 'other')",
}


def format_table(summary: dict) -> str:
    """The printed tables: ratios to the compute floor, then memory (when measured)."""
    from .profile_step import format_profile
    from .ratio import format_ratio_table

    parts = []
    if summary.get("floor_comparison"):
        parts.append(format_ratio_table(summary["floor_comparison"]))
    if summary.get("layouts"):
        parts.append(format_memory_table(summary))
    elif summary.get("memory_skipped"):
        parts.append(f"memory: not measured ({summary['memory_skipped']})")
    if summary.get("profile_step"):
        parts.append(format_profile(summary["profile_step"]))
    return "\n\n".join(parts)


def plot_bench(summary: dict, save_to) -> None:
    """The ratios to the compute floor per phase (and the memory per layout, when measured)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from .ratio import plot_ratios

    panels = [key for key in ("floor_comparison", "layouts") if summary.get(key)]
    fig = Figure(figsize=(7.5 * len(panels), 4.2))
    FigureCanvasAgg(fig)  # a headless canvas: no pyplot, no GUI backend, safe inside notebooks too
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, key in zip(axes, panels):
        if key == "floor_comparison":
            comparison, shape = summary[key], summary["shape"]
            plot_ratios(ax, comparison, f"PPO step / compute floor: base '{summary['base_size']}', "
                                        f"{comparison['precision']} on {comparison['device']}, batch {shape['batch']}")
        else:
            plot_memory(ax, summary)
    fig.tight_layout()
    save_to = Path(save_to)
    save_to.parent.mkdir(parents=True, exist_ok=True)
    tmp = save_to.with_name(f".{save_to.name}.tmp-{os.getpid()}")
    fig.savefig(tmp, dpi=110, format="png")
    os.replace(tmp, save_to)  # readers see the old chart or the new one, never half a file


def _check_arguments(base_size, steps, layouts, precision, device, jobs, time_budget, memory_steps) -> None:
    from .layouts import BASE_SIZES

    if base_size not in BASE_SIZES:
        raise MarlInputError(f"base_size={base_size!r} is not known; use one of {sorted(BASE_SIZES)}")
    for name, value in (("steps", steps), ("jobs", jobs)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise MarlInputError(f"{name}={value!r} must be a positive integer (steps: timed PPO steps per runner "
                                 "after a warm-up; use --steps 5)")
    if not isinstance(memory_steps, int) or memory_steps < 0:
        raise MarlInputError(f"memory_steps={memory_steps!r} must be an integer >= 0")
    unknown = [name for name in layouts if name not in LAYOUTS]
    if unknown:
        raise MarlInputError(f"unknown layouts {unknown}; choose from {list(LAYOUTS)}")
    if precision not in PRECISIONS:
        raise MarlInputError(f"precision={precision!r} is unknown; use one of {PRECISIONS} (8/4-bit bases are "
                             "memory layouts: run_bench(layouts=...))")
    if device not in DEVICES:
        raise MarlInputError(f"device={device!r} is unknown; use one of {DEVICES}")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise MarlInputError("device='cuda' but torch sees no CUDA device here (torch.cuda.is_available() is "
                                 "False); use --device cpu")
    if time_budget is not None and not (isinstance(time_budget, (int, float)) and time_budget > 0):
        raise MarlInputError(f"time_budget={time_budget!r} must be a positive number of seconds, or None")


def _memory_skipped(memory: bool, device: str, precision: str):
    if not memory:
        return "timing only (--timing-only)"
    if device != "cpu":
        return "memory is the host's resident set: measured with --device cpu"
    if precision != "fp32":
        return "memory is measured with fp32 compute (weights are float32 under bf16 autocast too)"
    return None


def run_bench(profile, output_dir=None, base_size: str = "mid", steps: int = 5, layouts=None,
              precision: str = "fp32", device: str | None = None, threads: int | None = None, jobs: int = 1,
              memory: bool = True, memory_steps: int = 1, time_budget: float | None = None,
              profile_step: bool = False, shape=None, compare=None) -> dict:
    """Time the layouts against the compute floor (this process), then measure memory (a process per layout).

    `steps`: timed interleaved repeats (each one PPO step of the floor and of every layout) after a warm-up.
    `layouts`: memory layouts, a subset of `LAYOUTS` (default `DEFAULT_LAYOUTS[base_size]`). `precision`: compute
    precision of the timing, fp32 or bf16 autocast. `device`: cpu or cuda (default: cuda where available).
    `threads`: torch threads (default: $MARL_BENCH_THREADS, else torch's default; 1 gives steadier times on a
    busy machine). `jobs`: memory processes at once (keep 1 when their times matter). `time_budget`: seconds
    for the timing part, loading included. `shape`: a `bench_floor.StepShape` instead of the size's own.
    `compare`: the layouts timed against the floor (default `bench_ratio.LAYOUTS`: marl, separate, critic_adapter).
    Writes OUT/bench.json and OUT/plots/bench.png; returns the json. Weights are random.
    """
    from .layouts import BENCH_LORA, QUANTIZED_NOTE, RANDOM_WEIGHTS_NOTE, STEP_SHAPES
    from ..infra.runs import default_output_dir, prepare_run_dir

    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    from .ratio import LAYOUTS as TIMED

    layouts = list(layouts or DEFAULT_LAYOUTS.get(base_size, ()))
    compare = tuple(TIMED if compare is None else compare)
    _check_arguments(base_size, steps, layouts, precision, device, jobs, time_budget, memory_steps)
    unknown = [name for name in compare if name not in TIMED]
    if unknown:
        raise MarlInputError(f"compare={list(compare)}: {unknown} are not timed layouts; choose from {list(TIMED)}")
    if any(not name.endswith("fp32") for name in layouts) and _memory_skipped(memory, device, precision) is None:
        from ..model.quantization import require_bitsandbytes

        require_bitsandbytes("the 8-bit and 4-bit layouts of `marl bench`")
    shape = shape or STEP_SHAPES[base_size]
    threads = int(threads if threads is not None else os.environ.get("MARL_BENCH_THREADS", 0))
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None

    out = prepare_run_dir(output_dir or default_output_dir(profile), profile)
    print(f"bench: preparing the '{base_size}' base and its reward adapter in {out / 'bench'} ...", flush=True)
    inputs = {**_prepare(out, base_size, BENCH_LORA, shape.batch), "shape": shape.as_dict()}
    inputs_file = out / "bench" / f"inputs-{base_size}.json"
    atomic_write_json(inputs_file, inputs)

    from .profile_step import profile_minibatch
    from .ratio import compare_to_floor

    with _torch_threads(threads):
        comparison = compare_to_floor(inputs, shape, precision=precision, device=device, steps=steps,
                                      layouts=compare, time_budget=time_budget)
        profiled = profile_minibatch(inputs, shape, precision=precision, device=device) if profile_step else None
    skipped = _memory_skipped(memory, device, precision)
    results = {} if skipped else measure_memory(layouts, inputs_file, memory_steps, threads, jobs)
    ratios, checks = summarise(results)
    summary = {
        "base_size": base_size, "base_params": inputs["base_params"], "base_sizes": inputs["sizes"],
        "lora": BENCH_LORA, "shape": shape.as_dict(), "precision": precision, "device": device,
        "note": RANDOM_WEIGHTS_NOTE, "quantized_note": QUANTIZED_NOTE, "steps": steps, "batch": shape.batch,
        "new_tokens": shape.new_tokens, "threads": comparison["threads"], "jobs": jobs, "phases": PHASES,
        "floor_comparison": comparison, "profile_step": profiled,
        "layouts": results, "memory_skipped": skipped, "memory_steps": memory_steps, "ratios": ratios,
        "checks": checks, "command": _command(base_size, steps, precision, device, memory, time_budget, profile_step,
                                           compare),
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                    "load_average_before": load_before,
                    "load_average_after": os.getloadavg() if hasattr(os, "getloadavg") else None},
        "rss_source": "VmHWM/VmRSS (/proc/self/status)" if rss_bytes() is not None else "ru_maxrss",
        "code": _code_version(),
    }
    atomic_write_json(out / "bench.json", summary)
    plot_bench(summary, out / "plots" / "bench.png")
    print(format_table(summary))
    print(f"bench: {RANDOM_WEIGHTS_NOTE}; wrote {out / 'bench.json'} and {out / 'plots' / 'bench.png'}")
    return summary


def _prepare(out: Path, base_size: str, lora: dict, batch: int) -> dict:
    from .layouts import prepare_bench_models

    return prepare_bench_models(out / "bench", base_size, lora, batch=batch)


@contextlib.contextmanager
def _torch_threads(threads: int):
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _code_version() -> dict:
    """The commit measured and the package files that differed from it (others edit the trainer meanwhile)."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "marl_utils"], cwd=root, capture_output=True,
                               text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "changed_files": None}
    return {"commit": commit.stdout.strip() or None,
            "changed_files": [line[3:] for line in dirty.stdout.splitlines()] if dirty.returncode == 0 else None}


def _command(base_size, steps, precision, device, memory, time_budget, profile_step, compare) -> str:
    from .ratio import LAYOUTS as TIMED_DEFAULT

    words = ["marl bench", f"--base-size {base_size}", f"--steps {steps}", f"--precision {precision}",
             f"--device {device}"]
    words += [] if memory else ["--timing-only"]
    words += [] if tuple(compare) == TIMED_DEFAULT else [f"--compare {','.join(compare)}"]
    words += [] if time_budget is None else [f"--time-budget {time_budget:g}"]
    words += ["--profile-step"] if profile_step else []
    threads = os.environ.get("MARL_BENCH_THREADS")
    return (f"MARL_BENCH_THREADS={threads} " if threads else "") + " ".join(words)
