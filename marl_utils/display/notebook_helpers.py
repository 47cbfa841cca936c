"""The notebooks' small helpers: memory per part of a multi-adapter model (04, 05), dequantized weights (04),
CPU threads for a small model, rounded numbers, a fresh folder per exercise (01-05), overlaid runs (04, 05).

A multi-adapter model is one base plus small extras. `footprint(model)` splits its resident memory into

| part                         | what it is                                                          |
|------------------------------|---------------------------------------------------------------------|
| `base/quantized`             | bitsandbytes layers: packed int8 / 4-bit weights and their scales  |
| `base/float`                 | the rest of the base (embeddings, norms, lm_head, unquantized linears) |
| `lora/<adapter>`             | the LoRA matrices of one adapter (policy or reward)                 |
| `value_head/<adapter>`       | the value head of one policy adapter                                |
| `reward_head`                | the reward adapter's score head                                     |

Bytes are those of the tensors' storage, each storage once: tied embeddings, views and a reference that IS
the base cost nothing extra. bitsandbytes keeps scales beside the packed weight (`Int8Params.SCB`, the
`quant_state.absmax` of 4-bit blocks); they are found through the parameter's and layer's attributes.
"""

from __future__ import annotations

import re
import time

import torch
from torch import nn

__all__ = ["storage_bytes", "footprint", "footprint_rows", "adapter_cost", "median_seconds", "plot_runs",
           "dequantized_weight", "plot_footprint", "set_cpu_threads", "fastest_threads", "rounded", "readable",
           "exercise_dir", "parameter_share"]

# LoRA tensors are named "...lora_A.<adapter>.weight", "...lora_embedding_B.<adapter>", "...lora_magnitude_vector.<adapter>..."
LORA_NAME = re.compile(r"\.(lora_[A-Za-z_]+)\.([^.]+)")


def _bnb_state_tensors(obj, depth: int = 3):
    """Tensors inside bitsandbytes state objects (QuantState and its nested state, MatmulLtState)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif depth <= 0 or isinstance(obj, (nn.Module, str, bytes, int, float, bool, type(None))):
        return
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _bnb_state_tensors(item, depth - 1)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _bnb_state_tensors(item, depth - 1)
    elif type(obj).__module__.startswith("bitsandbytes") and hasattr(obj, "__dict__"):
        for item in vars(obj).values():
            yield from _bnb_state_tensors(item, depth - 1)


def _is_bnb(module: nn.Module) -> bool:
    return type(module).__module__.startswith("bitsandbytes")


def _quantized_tensors(layer: nn.Module):
    """The packed weight, bias and every scale a bitsandbytes layer keeps (parameter attributes included)."""
    for tensor in list(layer._parameters.values()) + list(layer._buffers.values()):
        if tensor is not None:
            yield tensor
            yield from _bnb_state_tensors(vars(tensor) if hasattr(tensor, "__dict__") else None)
    for name, value in vars(layer).items():
        if not name.startswith("_"):
            yield from _bnb_state_tensors(value)


def storage_bytes(tensors) -> int:
    """Bytes of memory behind `tensors`, each underlying storage counted once (meta tensors count 0)."""
    sizes = {}
    for tensor in tensors:
        if tensor.device.type != "meta":
            storage = tensor.untyped_storage()
            sizes[(tensor.device, storage.data_ptr())] = storage.nbytes()
    return sum(sizes.values())


def _part_of(name: str) -> str:
    """The footprint part of one parameter/buffer of the model, from its qualified name."""
    if name.startswith("v_heads."):
        return "value_head/" + name.split(".")[1]
    if name.startswith("reward_head."):
        return "reward_head"
    match = LORA_NAME.search("." + name)
    if match:
        return "lora/" + match.group(2)
    return "base/float"


def footprint(model: nn.Module) -> dict[str, int]:
    """Bytes per part of `model` (see the module docstring), each storage counted once.

    Quantized layers are claimed first, then the remaining tensors by name; a storage already counted
    (a tied lm_head, say) is not counted again under a second part.
    """
    owner: dict = {}  # (device, data_ptr) -> (part, bytes)

    def claim(part, tensor):
        if tensor.device.type == "meta":
            return
        storage = tensor.untyped_storage()
        owner.setdefault((tensor.device, storage.data_ptr()), (part, storage.nbytes()))

    for module in model.modules():
        if _is_bnb(module):
            for tensor in _quantized_tensors(module):
                claim("base/quantized", tensor)
    for name, tensor in list(model.named_parameters(remove_duplicate=False)) + \
            list(model.named_buffers(remove_duplicate=False)):
        claim(_part_of(name), tensor)
    parts: dict[str, int] = {}
    for part, nbytes in owner.values():
        parts[part] = parts.get(part, 0) + nbytes
    return dict(sorted(parts.items()))


def footprint_rows(models: dict) -> list[dict]:
    """One row per model (e.g. {"fp32": m1, "8-bit": m2}): MiB per part, the base's total and the model's total.

    Build a table with `pandas.DataFrame(rows).set_index("model")`.
    """
    mib = 2 ** 20
    rows = []
    for label, model in models.items():
        parts = footprint(model)
        base = parts.get("base/quantized", 0) + parts.get("base/float", 0)
        extras = sum(v for k, v in parts.items() if not k.startswith("base/"))
        rows.append({"model": label,
                     "base quantized MiB": parts.get("base/quantized", 0) / mib,
                     "base float MiB": parts.get("base/float", 0) / mib,
                     "adapters + heads MiB": extras / mib,
                     "total MiB": (base + extras) / mib})
    return rows


def adapter_cost(model: nn.Module, adapter_name: str) -> int:
    """Bytes one policy adapter adds to the model: its LoRA matrices plus its value head."""
    parts = footprint(model)
    return parts.get(f"lora/{adapter_name}", 0) + parts.get(f"value_head/{adapter_name}", 0)


def dequantized_weight(layer: nn.Module) -> torch.Tensor:
    """The float32 [out, in] weight a linear layer computes with, ON THE CPU: bitsandbytes 8-bit/4-bit unpacked,
    else as is.

    8-bit (LLM.int8): int8 codes times each row's absmax / 127. 4-bit: each block of 64 codes looked up in
    the 16-entry table (FP4 or NF4) and times the block's absmax. The result is on the CPU whatever device the
    layer is on, so weights of layers on different devices (a quantized base on the GPU, a float one not yet
    moved) can be compared directly (notebook 04).
    """
    weight = layer.weight
    if type(layer).__name__ == "Linear8bitLt":
        return (weight.data.float() * (weight.SCB.float().unsqueeze(1) / 127.0)).cpu()
    if type(layer).__name__ == "Linear4bit":
        from bitsandbytes.functional import dequantize_4bit

        return dequantize_4bit(weight.data, weight.quant_state).float().cpu()
    if type(layer).__name__ == "Conv1D":  # GPT-2 stores its linear layers as [in, out]
        return weight.detach().float().t().cpu()
    return weight.detach().float().cpu()


SMALL_MODEL_PARAMETERS = 20_000_000
"""Below this many parameters, `set_cpu_threads` times one thread against torch's default on the CPU."""


def fastest_threads(step, candidates, repeats: int = 3) -> tuple[int, dict]:
    """(thread count, {count: median seconds}) of the count that runs `step()` fastest, timed interleaved."""
    import torch

    times = {n: [] for n in candidates}
    for _ in range(repeats):
        for n in candidates:  # interleaved: a burst of load elsewhere hits every candidate alike
            torch.set_num_threads(n)
            start = time.perf_counter()
            step()
            times[n].append(time.perf_counter() - start)
    medians = {n: sorted(t)[len(t) // 2] for n, t in times.items()}
    return min(medians, key=medians.get), medians


def set_cpu_threads(model: nn.Module, max_parameters: int = SMALL_MODEL_PARAMETERS, verbose: bool = False) -> int:
    """For a small model on the CPU, keep whichever of one thread and torch's default runs a training
    forward + backward faster; otherwise leave torch's choice. Returns the threads in use.

    Why: torch splits every matmul over its threads. For a GPT-2-sized model (124M) on the CPU that pays off
    and nothing needs deciding, and a model on the GPU does not use these threads. For the ~1M-parameter tiny
    profile the matmuls take microseconds and whether a second thread helps depends on the machine: measured
    on the 2-core CI machine with other jobs on it (load average ~2.5), two threads ran a tiny PPO step in
    0.66 s, one thread in 0.88 s; when every core is busy with other work, the extra thread waits for one.
    So this times both (a few hundred milliseconds). The results do not depend on the choice: the tiny
    model's logits and LoRA gradients came out bit-identical with one and two threads. Call it right after
    loading the model. Leaves no gradients behind and does not touch the random number generators.
    Introduced in notebook 03; used by 04 and 05.
    """
    import torch

    params = list(model.parameters())
    default = torch.get_num_threads()
    if not all(p.device.type == "cpu" for p in params) or sum(p.numel() for p in params) >= max_parameters \
            or default == 1:
        return default
    # any valid token ids time the same; the input embeddings may be wrapped by a LoRA layer, the config is not
    ids = torch.randint(min(model.config.vocab_size, 256), (16, 32), generator=torch.Generator().manual_seed(0))

    def forward_backward():
        logits, _, values = model(input_ids=ids)
        (logits.float().logsumexp(-1).mean() + values.float().mean()).backward()

    with torch.random.fork_rng():
        forward_backward()  # warm-up: the first pass pays one-off costs
        best, medians = fastest_threads(forward_backward, [1, default])
    for p in params:
        p.grad = None
    torch.set_num_threads(best)
    if verbose:
        print("seconds per forward + backward:", {n: round(t, 4) for n, t in medians.items()}, "->", best, "thread(s)")
    return best


def rounded(values, digits: int = 2) -> list[float]:
    """Python floats rounded to `digits` (a float32 tensor's `.round(decimals=2).tolist()` prints 0.9599999785)."""
    import torch

    if torch.is_tensor(values):
        values = values.detach().float().cpu().flatten().tolist()
    return [round(float(v), digits) + 0.0 for v in values]  # + 0.0: -0.0 (as -beta * 0 gives) prints as 0.0


def readable(text: str) -> str:
    """A decoded sample for a table: a byte-level token that is no whole UTF-8 character (decoded as U+FFFD, the
    replacement character) shows as "?". `ppo_eval.decode_text` already drops one cut at the end of a response."""
    return text.replace("\ufffd", "?")


def exercise_dir(out, name: str):
    """A fresh output folder for one exercise, `OUT/exercises/<name>`, so that it never reuses, or overwrites,
    the stages the notebooks share in `OUT` (notebooks 01-05).

    Why it matters: stage 2 trains the reward adapter ON the stage-1 model in `OUT/sft/`, and stage 3 loads
    that adapter onto that same model. A LoRA adapter is a small correction to particular base weights; on
    any other base (retrained with other settings, even just another seed) it computes other scores. An
    exercise that retrained `OUT/sft/` would leave `OUT/reward_adapter/` sitting on a base it was not
    trained on; one that ran into `OUT` without retraining would silently get the cached stage back.
    """
    from pathlib import Path

    return Path(out) / "exercises" / name


def parameter_share(part: int, whole: int) -> str:
    """'14.2% (36,865 of 259,840)': a part's share of a whole, computed, with both counts."""
    return f"{part / whole:.1%} ({part:,} of {whole:,})"


def median_seconds(fn, repeats: int = 5) -> float:
    """Median wall time of `fn()` over `repeats` calls (the median shrugs off one slow call on a busy CPU)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def plot_runs(histories: dict, keys, *, titles=None, smooth: int = 1, save_to=None):
    """Several runs' curves overlaid, one panel per metric: `histories` maps a label to a trainer's history."""
    from .plots import _plt, _smooth, set_count_axis

    plt = _plt()
    keys = list(keys)
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.2), squeeze=False)
    for ax, key, title in zip(axes[0], keys, titles or keys):
        for color, (label, history) in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"], histories.items()):
            ys = [float(row[key]) for row in history if key in row]
            ax.plot(ys, color=color, alpha=0.3 if smooth > 1 else 1.0)
            ax.plot(_smooth(ys, smooth), color=color, label=label)
        set_count_axis(ax, key)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.tight_layout()
    if save_to:
        fig.savefig(save_to, dpi=110)
    return fig


def plot_footprint(rows: list[dict], *, title: str = "parameter memory", save_to=None):
    """Stacked bars of `footprint_rows` output: quantized base, float base, adapters + heads (MiB)."""
    from .plots import _plt

    plt = _plt()
    parts = [("base quantized MiB", "tab:blue"), ("base float MiB", "tab:gray"), ("adapters + heads MiB", "tab:orange")]
    fig, ax = plt.subplots(figsize=(max(5, 1.4 * len(rows)), 3.4))
    labels = [row["model"] for row in rows]
    bottom = [0.0] * len(rows)
    for part, color in parts:
        heights = [row[part] for row in rows]
        ax.bar(labels, heights, bottom=bottom, color=color, label=part.replace(" MiB", ""))
        bottom = [b + h for b, h in zip(bottom, heights)]
    for i, total in enumerate(bottom):
        ax.annotate(f"{total:.2f}", (i, total), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("MiB")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    if save_to:
        fig.savefig(save_to, dpi=110)
    return fig
