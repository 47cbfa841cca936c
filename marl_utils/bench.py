"""`marl bench`: memory and time of one shared base (MARL) against separate models (README "Performance").

    marl bench [--profile P] [--base-size tiny|mid|large] [--output-dir OUT] [--steps 3]

Each layout x precision runs in its OWN process (`python -m marl_utils.bench --layout ...`), so its peak
resident set is its own. A layout process measures:

- param_bytes: the bytes its modules hold (parameters, buffers, bitsandbytes scales), shared storage once;
- baseline_rss_bytes: its resident set right after the imports (torch + transformers + peft), before any
  model; peak_rss_bytes: its peak resident set over its whole life; model RSS = peak - baseline;
- train_peak_rss_bytes: the peak during the PPO steps alone. Loading on a CPU has its own transient (the
  quantized layouts read and quantize the float32 checkpoint), which only the whole-life peak holds; the heap
  that loading frees is handed back to the OS first (glibc `malloc_trim`), the same in every layout;
- step_seconds: median over `steps` PPO steps (after one warm-up) of generate / score / optimise, from
  `bench_layouts.timed_ppo_step`, the same code for both layouts; marl_fp32 also times one step of the
  project's `PPOTrainer` as a cross-check (`ppo_trainer_seconds`).

Peaks come from the kernel's high-water mark (`VmHWM` in /proc/self/status). `getrusage(...).ru_maxrss` is
not used where /proc exists: a process started from a bigger one inherits that one's peak in ru_maxrss.
Results go to `OUT/bench.json` and `OUT/plots/bench.png`, and a table is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .atomic import atomic_write_json
from .errors import MarlInputError

LAYOUTS = ("marl_fp32", "separate_fp32", "marl_8bit", "separate_8bit", "marl_4bit", "separate_4bit")
DEFAULT_LAYOUTS = {
    "tiny": LAYOUTS,
    # On a CPU the separate 8/4-bit layouts quantize four copies and run 4-bit backward slowly: minutes more.
    # Ask for them with run_bench(..., layouts=LAYOUTS).
    "mid": ("marl_fp32", "separate_fp32", "marl_8bit", "marl_4bit"),
}
DEFAULT_LAYOUTS["large"] = DEFAULT_LAYOUTS["mid"]
CHECKS = [  # (name, numerator, denominator, key, limit): the acceptance of issue 6
    ("MARL param bytes / separate", "marl_fp32", "separate_fp32", "param_bytes", 0.30),
    ("MARL model RSS / separate", "marl_fp32", "separate_fp32", "model_rss_bytes", 0.45),
    ("MARL peak RSS / separate (with imports)", "marl_fp32", "separate_fp32", "peak_rss_bytes", 0.45),
    ("8-bit param bytes / fp32 (MARL)", "marl_8bit", "marl_fp32", "param_bytes", 0.35),
    ("4-bit param bytes / fp32 (MARL)", "marl_4bit", "marl_fp32", "param_bytes", 0.20),
]
STEP_PARTS = {
    "generate": "sample new_tokens per prompt with the policy (no grad)",
    "score": "reward score + reference logprobs + the rollout's policy logprobs and values (no grad)",
    "optimise": "forward with grad, PPO loss (clipped policy + value), backward, AdamW step",
}
MB = 1e6


# ---------------------------------------------------------------------------- resident set of this process
def _status_kb(field: str):
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def rss_bytes():
    """This process's resident set now (None where /proc is missing)."""
    return _status_kb("VmRSS")


def peak_rss_bytes() -> int:
    """This process's peak resident set: VmHWM, else ru_maxrss (kB on Linux, bytes on macOS)."""
    peak = _status_kb("VmHWM")
    if peak is not None:
        return peak
    import resource

    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024


def return_free_heap() -> None:
    """Hand memory freed by loading back to the OS (glibc keeps freed heap otherwise; a no-op elsewhere).

    On-the-fly quantization frees about the float32 model's size in temporaries; without this they would
    stay in the resident set of a quantized layout for the whole run although nothing uses them.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak_rss() -> bool:
    """Restart the high-water mark at the current resident set (Linux: `5` into /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------------- one layout, in its own process
def measure_layout(layout: str, precision: str, inputs: dict, steps: int, new_tokens: int,
                   cross_check: bool = True) -> dict:
    """Load one layout, run 1 + `steps` timed PPO steps, return its figures (run this in a fresh process)."""
    import statistics

    import torch
    from transformers import AutoConfig, MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING

    from . import bench_layouts as bl

    import peft.tuners.lora  # noqa: F401

    # peft loads bitsandbytes on first use, PPOTrainer loads accelerate: imported up front, they are part of the
    # baseline, the same in every layout process of a run
    for optional in ("bitsandbytes", "accelerate") if cross_check else ("bitsandbytes",):
        try:
            __import__(optional)
        except ImportError:
            pass
    config = AutoConfig.from_pretrained(inputs["base"])
    for mapping in (MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING):
        mapping[type(config)]  # import the model code now, so the baseline holds all code and no weights
    baseline = rss_bytes()

    start = time.perf_counter()
    model = bl.load_layout(layout, precision, inputs)
    load_seconds = time.perf_counter() - start
    return_free_heap()  # the same for every layout: what stays resident after loading is what the model uses
    after_load, load_peak = rss_bytes(), peak_rss_bytes()
    can_reset = reset_peak_rss()

    pad_id, prompts = inputs["pad_id"], inputs["prompts"]
    width = max(len(p) for p in prompts)
    prompt_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])  # left padding
    prompt_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-5)
    torch.manual_seed(0)
    timings = [bl.timed_ppo_step(model, prompt_ids, prompt_mask, new_tokens, optimizer) for _ in range(steps + 1)]
    timed = timings[1:]  # the first step warms up allocators and kernels
    seconds = {part: statistics.median(t[part] for t in timed) for part in STEP_PARTS}
    seconds["total"] = sum(seconds.values())

    peak, train_peak = max(load_peak, peak_rss_bytes()), peak_rss_bytes() if can_reset else None
    modules = list(model.modules().values())
    total, quantized, adapters = bl.resident_bytes(*modules), bl.quantized_bytes(*modules), bl.adapter_bytes(*modules)
    trainer_seconds = None
    if layout == "marl" and precision == "fp32" and cross_check:  # after the memory figures: they must not move
        trainer_seconds = _trainer_cross_check(model, inputs, new_tokens)
    return {
        "layout": layout, "precision": precision,
        "param_bytes": total, "quantized_param_bytes": quantized, "adapter_and_head_bytes": adapters,
        "unquantized_base_bytes": total - quantized - adapters,
        "unquantized_dtype": str(bl.UNQUANTIZED_DTYPE if precision != "fp32" else torch.float32).replace("torch.", ""),
        "models": {name: bl.resident_bytes(module) for name, module in model.modules().items()},
        "trainable_params": sum(p.numel() for p in model.trainable_parameters()),
        "baseline_rss_bytes": baseline, "after_load_rss_bytes": after_load, "peak_rss_bytes": peak,
        "model_rss_bytes": peak - baseline if baseline is not None else None,
        "train_peak_rss_bytes": train_peak,
        "load_seconds": load_seconds, "step_seconds": seconds, "ppo_trainer_seconds": trainer_seconds,
        "threads": torch.get_num_threads(),
    }


def _trainer_cross_check(layout, inputs: dict, new_tokens: int) -> dict:
    """Seconds of `PPOTrainer.generate` / `score` / `step` on the warm MARL model: one batch, epoch, minibatch.

    A cross-check of `timed_ppo_step` on the project's own trainer: its `score` is the reward alone, its `step`
    also runs the rollout and reference forwards that `timed_ppo_step` counts in "score". Never fails the bench.
    """
    try:
        import torch
        from transformers import AutoTokenizer

        from .ppo import PPOTrainer
        from .ppo_config import PPOConfig

        prompts = inputs["prompts"]
        config = PPOConfig(batch_size=len(prompts), mini_batch_size=len(prompts), ppo_epochs=1,
                           max_new_tokens=new_tokens, learning_rate=1e-5, adap_kl_ctrl=False, init_kl_coef=0.05)
        trainer = PPOTrainer(config, model=layout.model, tokenizer=AutoTokenizer.from_pretrained(inputs["base"]))
        queries = [torch.tensor(prompt) for prompt in prompts]
        start = time.perf_counter()
        responses = trainer.generate(queries, batch_size=len(queries))
        generated = time.perf_counter()
        scores = trainer.score(queries, responses)
        scored = time.perf_counter()
        trainer.step(queries, responses, scores)
        return {"generate": generated - start, "score": scored - generated, "step": time.perf_counter() - scored}
    except Exception as err:  # e.g. a trainer mid-change; the layouts' own figures stand without it
        return {"error": f"{type(err).__name__}: {err}"[:300]}


def _layout_main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m marl_utils.bench", description="one layout of `marl bench`")
    parser.add_argument("--layout", required=True, choices=["marl", "separate"])
    parser.add_argument("--precision", required=True, choices=["fp32", "8bit", "4bit"])
    parser.add_argument("--inputs", required=True, help="json written by run_bench: folders and prompts")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--result", required=True, help="where to write this layout's json")
    parser.add_argument("--no-cross-check", action="store_true", help="skip the PPOTrainer timings (MARL)")
    args = parser.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    inputs = json.loads(Path(args.inputs).read_text())
    result = measure_layout(args.layout, args.precision, inputs, args.steps, args.new_tokens,
                            cross_check=not args.no_cross_check)
    atomic_write_json(args.result, result)
    return 0


# ---------------------------------------------------------------------------- all layouts
def _run_layout_process(name: str, inputs_file: Path, steps: int, new_tokens: int, threads: int,
                        cross_check: bool) -> dict:
    layout, precision = name.split("_")
    with tempfile.TemporaryDirectory() as tmp:
        result_file = Path(tmp) / "result.json"
        command = [sys.executable, "-m", "marl_utils.bench", "--layout", layout, "--precision", precision,
                   "--inputs", str(inputs_file), "--steps", str(steps), "--new-tokens", str(new_tokens),
                   "--threads", str(threads), "--result", str(result_file)]
        command += [] if cross_check else ["--no-cross-check"]
        package_root = str(Path(__file__).resolve().parent.parent)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
               "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0 or not result_file.exists():
            raise RuntimeError(f"bench layout {name} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
        return json.loads(result_file.read_text())


def _ordered(layouts: dict) -> list:
    """Layout names in `LAYOUTS` order (the json is written with sorted keys)."""
    return sorted(layouts, key=lambda name: LAYOUTS.index(name) if name in LAYOUTS else len(LAYOUTS))


def _ratio(layouts: dict, num: str, den: str, key: str):
    a, b = layouts.get(num, {}).get(key), layouts.get(den, {}).get(key)
    return round(a / b, 4) if a is not None and b else None


def summarise(layouts: dict) -> tuple[dict, dict]:
    """(ratios, checks): every layout against separate_fp32 and marl_fp32, and the issue-6 acceptance."""
    ratios = {}
    for name in layouts:
        for key in ("param_bytes", "peak_rss_bytes", "model_rss_bytes", "train_peak_rss_bytes"):
            for den in ("separate_fp32", "marl_fp32"):
                value = _ratio(layouts, name, den, key)
                if value is not None and name != den:
                    ratios[f"{name}/{den}.{key}"] = value
    for name, row in layouts.items():
        # what the quantized layout would hold with its unquantized layers in float32 instead (same tensors)
        if row.get("unquantized_dtype") in ("bfloat16", "float16") and "marl_fp32" in layouts:
            as_float32 = row["param_bytes"] + row["unquantized_base_bytes"]
            ratios[f"{name}/marl_fp32.param_bytes_if_unquantized_float32"] = round(
                as_float32 / layouts["marl_fp32"]["param_bytes"], 4)
    checks = {}
    for label, num, den, key, limit in CHECKS:
        value = _ratio(layouts, num, den, key)
        if value is not None:
            checks[label] = {"ratio": value, "limit": limit, "ok": value <= limit}
    return ratios, checks


def format_table(summary: dict) -> str:
    """The printed table: MB, ratios against separate_fp32 and marl_fp32, seconds per step."""
    layouts = {name: summary["layouts"][name] for name in _ordered(summary["layouts"])}
    head = (f"{'layout':<14}{'params MB':>10}{'x sep':>7}{'x marl':>7}{'peak RSS':>10}{'model RSS':>10}"
            f"{'x sep':>7}{'train RSS':>10}{'gen s':>8}{'score s':>8}{'opt s':>8}{'step s':>8}")
    lines = [head, "-" * len(head)]
    for name, row in layouts.items():
        def x(den, key):
            value = _ratio(layouts, name, den, key)
            return f"{value:.2f}" if value is not None else "-"
        train = row.get("train_peak_rss_bytes")
        train_model = f"{(train - row['baseline_rss_bytes']) / MB:.0f}" if train and row["baseline_rss_bytes"] else "-"
        model_rss = f"{row['model_rss_bytes'] / MB:.0f}" if row["model_rss_bytes"] is not None else "-"
        s = row["step_seconds"]
        lines.append(f"{name:<14}{row['param_bytes'] / MB:>10.1f}{x('separate_fp32', 'param_bytes'):>7}"
                     f"{x('marl_fp32', 'param_bytes'):>7}{row['peak_rss_bytes'] / MB:>10.0f}{model_rss:>10}"
                     f"{x('separate_fp32', 'model_rss_bytes'):>7}{train_model:>10}{s['generate']:>8.2f}"
                     f"{s['score']:>8.2f}{s['optimise']:>8.2f}{s['total']:>8.2f}")
    lines.append("model RSS = peak RSS - the process's RSS after imports; train RSS = the same during the PPO "
                 "steps only (MB = 1e6 bytes)")
    for name, row in layouts.items():
        cross = row.get("ppo_trainer_seconds")
        if cross and "error" not in cross:
            lines.append(f"PPOTrainer on {name} (1 step, 1 epoch): generate {cross['generate']:.2f} s, score "
                         f"{cross['score']:.2f} s, step {cross['step']:.2f} s")
        elif cross:
            lines.append(f"PPOTrainer on {name}: not timed ({cross['error']})")
    for label, check in sorted(summary["checks"].items(), key=lambda item: [c[0] for c in CHECKS].index(item[0])):
        lines.append(f"{'ok  ' if check['ok'] else 'FAIL'} {label}: {check['ratio']:.3f} (<= {check['limit']})")
    return "\n".join(lines)


def plot_bench(summary: dict, save_to) -> None:
    """Two panels: MB per layout (params, model RSS) and seconds per PPO step split by part."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    layouts = summary["layouts"]
    names = _ordered(layouts)
    fig = Figure(figsize=(max(9, 2.2 * len(names)), 4.0))
    FigureCanvasAgg(fig)  # a headless canvas: no pyplot, no GUI backend, safe inside notebooks too
    mem, time_ax = fig.subplots(1, 2)
    xs = range(len(names))

    def during_steps(row):
        train = row.get("train_peak_rss_bytes")
        return train - row["baseline_rss_bytes"] if train and row["baseline_rss_bytes"] else 0

    bars = [("param bytes", lambda row: row["param_bytes"]),
            ("model RSS: peak - baseline", lambda row: row["model_rss_bytes"] or 0),
            ("model RSS during the PPO steps", during_steps)]
    tallest = 0.0
    for i, (label, value) in enumerate(bars):
        heights = [value(layouts[n]) / MB for n in names]
        drawn = mem.bar([x + (i - 1) * 0.28 for x in xs], heights, width=0.28, label=label)
        mem.bar_label(drawn, fmt="%.0f", fontsize=6, rotation=90, padding=2)  # upright: 4-digit labels collide
        tallest = max(tallest, *heights)
    mem.set_ylim(0, tallest * 1.6)  # room for the legend above the bars
    mem.set_xticks(list(xs), names, rotation=25, ha="right")
    mem.set_ylabel("MB")
    mem.set_title(f"memory, base '{summary['base_size']}' ({summary['base_params'] / 1e6:.1f}M params)")
    mem.legend(fontsize=7, loc="upper left")
    bottom = [0.0] * len(names)
    for part in STEP_PARTS:
        values = [layouts[n]["step_seconds"][part] for n in names]
        time_ax.bar(list(xs), values, bottom=bottom, label=part)
        bottom = [b + v for b, v in zip(bottom, values)]
    time_ax.set_xticks(list(xs), names, rotation=25, ha="right")
    time_ax.set_ylabel("seconds per PPO step")
    time_ax.set_title(f"time: {summary['threads']} thread(s), batch {summary['batch']}, "
                      f"{summary['new_tokens']} new tokens")
    time_ax.legend(fontsize=8)
    fig.tight_layout()
    save_to = Path(save_to)
    save_to.parent.mkdir(parents=True, exist_ok=True)
    tmp = save_to.with_name(f".{save_to.name}.tmp-{os.getpid()}")
    fig.savefig(tmp, dpi=110, format="png")
    os.replace(tmp, save_to)  # readers see the old chart or the new one, never half a file


def run_bench(profile, output_dir=None, base_size: str = "mid", steps: int = 3, layouts=None, batch: int = 8,
              new_tokens: int = 16, threads: int | None = None, cross_check: bool = True, jobs: int = 1) -> dict:
    """Measure every layout in its own process; write OUT/bench.json and OUT/plots/bench.png; return the json.

    `layouts`: a subset of `LAYOUTS` (default `DEFAULT_LAYOUTS[base_size]`). `threads`: torch threads per layout
    process (default: $MARL_BENCH_THREADS, else torch's default; 1 gives steadier times on a busy machine).
    `cross_check`: also time one `PPOTrainer` step on marl_fp32.
    `jobs`: layout processes run at once; keep 1 for timings (more only gets memory figures sooner).
    Weights are random (see `bench_layouts.RANDOM_WEIGHTS_NOTE`).
    """
    from .bench_layouts import BASE_SIZES, QUANTIZED_NOTE, RANDOM_WEIGHTS_NOTE, prepare_bench_models
    from .runs import default_output_dir, prepare_run_dir

    if base_size not in BASE_SIZES:
        raise MarlInputError(f"base_size={base_size!r} is not known; use one of {sorted(BASE_SIZES)}")
    if not isinstance(steps, int) or steps < 1:
        raise MarlInputError(f"steps={steps!r}: the bench needs at least 1 timed step (plus a warm-up); use --steps 3")
    for name, value in (("batch", batch), ("new_tokens", new_tokens), ("jobs", jobs)):
        if not isinstance(value, int) or value < 1:
            raise MarlInputError(f"{name}={value!r} must be a positive integer")
    layouts = list(layouts or DEFAULT_LAYOUTS[base_size])
    unknown = [name for name in layouts if name not in LAYOUTS]
    if unknown:
        raise MarlInputError(f"unknown layouts {unknown}; choose from {list(LAYOUTS)}")
    if any(not name.endswith("fp32") for name in layouts):
        from .quantization import require_bitsandbytes

        require_bitsandbytes("the 8-bit and 4-bit layouts of `marl bench`")
    threads = int(threads if threads is not None else os.environ.get("MARL_BENCH_THREADS", 0))

    out = prepare_run_dir(output_dir or default_output_dir(profile), profile)
    lora = {"r": profile.ppo_lora_r, "alpha": profile.ppo_lora_alpha,
            "target_modules": list(profile.lora_target_modules) if profile.lora_target_modules else None}
    print(f"bench: preparing the '{base_size}' base and its reward adapter in {out / 'bench'} ...", flush=True)
    inputs = prepare_bench_models(out / "bench", base_size, lora, batch=batch)
    inputs_file = out / "bench" / f"inputs-{base_size}.json"
    atomic_write_json(inputs_file, inputs)

    def run_one(name):
        started = time.perf_counter()
        result = _run_layout_process(name, inputs_file, steps, new_tokens, threads, cross_check)
        print(f"bench: {name:<14} {result['param_bytes'] / MB:8.1f} MB params, peak RSS "
              f"{result['peak_rss_bytes'] / MB:6.0f} MB ({time.perf_counter() - started:.0f} s)", flush=True)
        return result

    with ThreadPoolExecutor(max_workers=jobs) as pool:  # each layout is its own process either way
        results = dict(zip(layouts, pool.map(run_one, layouts)))
    ratios, checks = summarise(results)
    first = next(iter(results.values()))
    summary = {
        "base_size": base_size, "base_params": inputs["base_params"], "base_sizes": inputs["sizes"],
        "note": RANDOM_WEIGHTS_NOTE, "quantized_note": QUANTIZED_NOTE, "steps": steps, "batch": len(inputs["prompts"]), "new_tokens": new_tokens,
        "threads": first["threads"], "jobs": jobs, "step_parts": STEP_PARTS, "layouts": results, "ratios": ratios,
        "checks": checks, "command": f"marl bench --base-size {base_size} --steps {steps}",
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()},
        "rss_source": "VmHWM/VmRSS (/proc/self/status)" if rss_bytes() is not None else "ru_maxrss",
    }
    atomic_write_json(out / "bench.json", summary)
    plot_bench(summary, out / "plots" / "bench.png")
    print(format_table(summary))
    print(f"bench: {RANDOM_WEIGHTS_NOTE}; wrote {out / 'bench.json'} and {out / 'plots' / 'bench.png'}")
    return summary


if __name__ == "__main__":
    sys.exit(_layout_main())
