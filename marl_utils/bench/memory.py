"""The memory part of `marl bench`: bytes the models hold, the resident set, each layout in its own process.

- `resident_bytes`: parameters, buffers and bitsandbytes quantization state, each storage counted ONCE;
- `rss_bytes` / `peak_rss_bytes`: the kernel's VmRSS / VmHWM (/proc/self/status). `getrusage(...).ru_maxrss`
  is only the fallback: a process started from a bigger one inherits that one's peak in ru_maxrss;
- `measure_memory`: every layout x weight precision in a fresh `python -m marl_utils.bench.memory` process,
  so that its peak is its own (see `bench.py` for what each figure means).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from ..infra.atomic import atomic_write_json
from ..infra.process_memory import peak_rss_bytes, reset_peak_rss, return_free_heap, rss_bytes  # noqa: F401 - public here too

LAYOUTS = ("marl_fp32", "critic_fp32", "separate_fp32", "marl_8bit", "separate_8bit", "marl_4bit", "separate_4bit")
DEFAULT_LAYOUTS = {
    "tiny": LAYOUTS,
    # On a CPU the separate 8/4-bit layouts quantize four copies and run 4-bit backward slowly: minutes more.
    # Ask for them with run_bench(..., layouts=LAYOUTS).
    "mid": ("marl_fp32", "critic_fp32", "separate_fp32", "marl_8bit", "marl_4bit"),
    "gpt2": ("marl_fp32", "separate_fp32"),
}
DEFAULT_LAYOUTS["large"] = DEFAULT_LAYOUTS["mid"]
CHECKS = [  # (name, numerator, denominator, key, limit): the acceptance of issue 6
    ("MARL param bytes / separate", "marl_fp32", "separate_fp32", "param_bytes", 0.30),
    ("MARL model RSS / separate", "marl_fp32", "separate_fp32", "model_rss_bytes", 0.45),
    ("MARL peak RSS / separate (with imports)", "marl_fp32", "separate_fp32", "peak_rss_bytes", 0.45),
    ("8-bit param bytes / fp32 (MARL)", "marl_8bit", "marl_fp32", "param_bytes", 0.35),
    ("4-bit param bytes / fp32 (MARL)", "marl_4bit", "marl_fp32", "param_bytes", 0.20),
]
MB = 1e6
STEP_TIMES = ("generate", "score", "rollout", "optimise", "total")


# ---------------------------------------------------------------------------- resident bytes of modules
def _tensors_in(obj, depth: int = 4):
    """Tensors held by a bitsandbytes object (QuantState, MatmulLtState) or a container of them."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif depth <= 0 or isinstance(obj, (torch.nn.Module, str, bytes, int, float, bool, type(None))):
        return
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors_in(item, depth - 1)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors_in(item, depth - 1)
    elif type(obj).__module__.startswith("bitsandbytes") and hasattr(obj, "__dict__"):
        for item in vars(obj).values():
            yield from _tensors_in(item, depth - 1)


def resident_tensors(*modules):
    """Every tensor the modules keep in memory: parameters, buffers and quantization state.

    bitsandbytes keeps the packed weight as the parameter (int8, or two 4-bit values per uint8) and its scales
    beside it: `Int8Params.SCB`, `Params4bit.quant_state.absmax` (and the nested state of double
    quantization), `Linear8bitLt.state`. Those are reached through the parameter's and the module's attributes.
    """
    for module in modules:
        for sub in module.modules():
            for tensor in list(sub._parameters.values()) + list(sub._buffers.values()):
                if tensor is None:
                    continue
                yield tensor
                yield from _tensors_in(vars(tensor) if hasattr(tensor, "__dict__") else None)
            for name, value in vars(sub).items():
                if not name.startswith("_"):
                    yield from _tensors_in(value, depth=2) if not isinstance(value, torch.Tensor) else [value]


def storage_bytes(tensors) -> int:
    """Bytes of memory behind `tensors`, each storage counted ONCE (keyed by `untyped_storage().data_ptr()`).

    Tied weights, views and anything else that shares memory (a reference model that IS the base) count once.
    """
    sizes = {}
    for tensor in tensors:
        if tensor.device.type != "meta":
            storage = tensor.untyped_storage()
            sizes[storage.data_ptr()] = storage.nbytes()
    return sum(sizes.values())


def resident_bytes(*modules) -> int:
    """Bytes the modules hold in memory (parameters, buffers, quantization state), shared storage once."""
    return storage_bytes(resident_tensors(*modules))


def quantized_bytes(*modules) -> int:
    """The part of `resident_bytes` in bitsandbytes layers (packed weights + scales); the rest stays float."""
    layers = [m for module in modules for m in module.modules() if type(m).__module__.startswith("bitsandbytes")]
    return resident_bytes(*layers)


def adapter_bytes(*modules) -> int:
    """Bytes of the LoRA matrices and the small heads (value heads, score heads): what is not base weight."""
    def is_adapter_or_head(name: str) -> bool:
        return "lora_" in name or name.startswith(("v_heads.", "reward_head.")) or name.endswith(("score.weight",
                                                                                                  "score.bias"))

    tensors = [p for module in modules for name, p in module.named_parameters() if is_adapter_or_head(name)]
    return storage_bytes(tensors)


# ---------------------------------------------------------------------------- one layout, in its own process
def measure_layout(layout: str, precision: str, inputs: dict, steps: int) -> dict:
    """Load one layout, run 1 + `steps` PPO steps, return its memory figures (run this in a fresh process)."""
    import statistics

    import torch
    from transformers import AutoConfig, MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING

    from . import layouts as bl
    from .floor import StepShape
    import peft.tuners.lora  # noqa: F401

    try:  # peft loads bitsandbytes on first use: imported up front, it is part of every layout's baseline
        import bitsandbytes  # noqa: F401
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

    shape = StepShape(**{k: v for k, v in inputs["shape"].items() if k != "mini_batch_size"})
    prompt_ids, prompt_mask = bl.left_padded(inputs["prompts"], inputs["pad_id"])
    optimizer = torch.optim.Adam(model.trainable_parameters(), lr=1e-5)
    torch.manual_seed(0)
    timings = [bl.timed_ppo_step(model, prompt_ids, prompt_mask, shape, optimizer) for _ in range(steps + 1)]
    timed = timings[1:] or timings  # after a warm-up (steps=0: the warm-up alone, enough for the train peak)
    seconds = {part: statistics.median(t[part] for t in timed) for part in STEP_TIMES}

    peak, train_peak = max(load_peak, peak_rss_bytes()), peak_rss_bytes() if can_reset else None
    modules = list(model.modules().values())
    total, quantized, adapters = resident_bytes(*modules), quantized_bytes(*modules), adapter_bytes(*modules)
    return {
        "layout": layout, "precision": precision,
        "param_bytes": total, "quantized_param_bytes": quantized, "adapter_and_head_bytes": adapters,
        "unquantized_base_bytes": total - quantized - adapters,
        "unquantized_dtype": str(bl.UNQUANTIZED_DTYPE if precision != "fp32" else torch.float32).replace("torch.", ""),
        "models": {name: resident_bytes(module) for name, module in model.modules().items()},
        "trainable_params": sum(p.numel() for p in model.trainable_parameters()),
        "baseline_rss_bytes": baseline, "after_load_rss_bytes": after_load, "peak_rss_bytes": peak,
        "model_rss_bytes": peak - baseline if baseline is not None else None,
        "train_peak_rss_bytes": train_peak,
        "load_seconds": load_seconds, "step_seconds": seconds, "threads": torch.get_num_threads(),
    }


def _layout_main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m marl_utils.bench.memory", description="one layout of `marl bench`")
    parser.add_argument("--layout", required=True, choices=["marl", "critic", "separate"])
    parser.add_argument("--precision", required=True, choices=["fp32", "8bit", "4bit"])
    parser.add_argument("--inputs", required=True, help="json written by run_bench: folders, prompts, step shape")
    parser.add_argument("--steps", type=int, default=1, help="PPO steps after the warm-up")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--result", required=True, help="where to write this layout's json")
    args = parser.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    inputs = json.loads(Path(args.inputs).read_text())
    atomic_write_json(args.result, measure_layout(args.layout, args.precision, inputs, args.steps))
    return 0


# ---------------------------------------------------------------------------- all layouts
def _run_layout_process(name: str, inputs_file: Path, steps: int, threads: int) -> dict:
    layout, precision = name.split("_")
    with tempfile.TemporaryDirectory() as tmp:
        result_file = Path(tmp) / "result.json"
        command = [sys.executable, "-m", "marl_utils.bench.memory", "--layout", layout, "--precision", precision,
                   "--inputs", str(inputs_file), "--steps", str(steps), "--threads", str(threads),
                   "--result", str(result_file)]
        package_root = str(Path(__file__).resolve().parents[2])
        # CUDA_VISIBLE_DEVICES="": memory is the host's resident set, so the layouts stay on the CPU
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "CUDA_VISIBLE_DEVICES": "",
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


def format_memory_table(summary: dict) -> str:
    """MB per layout and the ratios against separate_fp32 and marl_fp32."""
    layouts = {name: summary["layouts"][name] for name in _ordered(summary["layouts"])}
    head = (f"{'layout':<14}{'params MB':>10}{'x sep':>7}{'x marl':>7}{'peak RSS':>10}{'model RSS':>10}"
            f"{'x sep':>7}{'train RSS':>10}")
    lines = [head, "-" * len(head)]
    for name, row in layouts.items():
        def x(den, key):
            value = _ratio(layouts, name, den, key)
            return f"{value:.2f}" if value is not None else "-"
        train = row.get("train_peak_rss_bytes")
        train_model = f"{(train - row['baseline_rss_bytes']) / MB:.0f}" if train and row["baseline_rss_bytes"] else "-"
        model_rss = f"{row['model_rss_bytes'] / MB:.0f}" if row["model_rss_bytes"] is not None else "-"
        lines.append(f"{name:<14}{row['param_bytes'] / MB:>10.1f}{x('separate_fp32', 'param_bytes'):>7}"
                     f"{x('marl_fp32', 'param_bytes'):>7}{row['peak_rss_bytes'] / MB:>10.0f}{model_rss:>10}"
                     f"{x('separate_fp32', 'model_rss_bytes'):>7}{train_model:>10}")
    lines.append("model RSS = peak RSS - the process's RSS after imports; train RSS = the same during the PPO "
                 "steps only (MB = 1e6 bytes)")
    for label, check in sorted(summary["checks"].items(), key=lambda item: [c[0] for c in CHECKS].index(item[0])):
        lines.append(f"{'ok  ' if check['ok'] else 'FAIL'} {label}: {check['ratio']:.3f} (<= {check['limit']})")
    return "\n".join(lines)


def plot_memory(ax, summary: dict) -> None:
    """Three bars per layout: param bytes, model RSS over the whole life, model RSS during the PPO steps."""
    layouts = summary["layouts"]
    names = _ordered(layouts)
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
        drawn = ax.bar([x + (i - 1) * 0.28 for x in xs], heights, width=0.28, label=label)
        ax.bar_label(drawn, fmt="%.0f", fontsize=6, rotation=90, padding=2)  # upright: 4-digit labels collide
        tallest = max(tallest, *heights)
    ax.set_ylim(0, tallest * 1.6)  # room for the legend above the bars
    ax.set_xticks(list(xs), names, rotation=25, ha="right")
    ax.set_ylabel("MB")
    ax.set_title(f"memory, base '{summary['base_size']}' ({summary['base_params'] / 1e6:.1f}M params)")
    ax.legend(fontsize=7, loc="upper left")


def measure_memory(layouts, inputs_file: Path, steps: int, threads: int, jobs: int) -> dict:
    """Each layout in its own process (`jobs` at once); their figures by name."""
    def run_one(name):
        started = time.perf_counter()
        result = _run_layout_process(name, inputs_file, steps, threads)
        print(f"bench: memory of {name:<14} {result['param_bytes'] / MB:8.1f} MB params, peak RSS "
              f"{result['peak_rss_bytes'] / MB:6.0f} MB ({time.perf_counter() - started:.0f} s)", flush=True)
        return result

    with ThreadPoolExecutor(max_workers=jobs) as pool:  # each layout is its own process either way
        return dict(zip(layouts, pool.map(run_one, layouts)))


if __name__ == "__main__":
    sys.exit(_layout_main())
