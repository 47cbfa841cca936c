"""`marl bench --profile-step`: where one training minibatch of our PPOTrainer spends its time, vs the floor.

A minibatch is the stretch between two optimizer steps: forward with gradients, PPO loss, backward, Adam
step, zero_grad and whatever glue the trainer runs in between. It is found from the outside, with torch's
optimizer step hook, so this works on whatever the trainer's code is today: the window opens when the first
optimizer step of a PPO step ends and closes `minibatches` steps later. Two passes per runner, after a
warm-up step: one by the clock alone (seconds per minibatch), one under `torch.profiler` (ops with shapes).

Every op's self time goes to one bucket, by its name, its input shapes and whether it runs inside the
optimizer step (V = vocabulary size, r = LoRA rank, H = hidden size):

    base linear layers     matmuls with the frozen weights (forward, and backward to their inputs)
    LoRA A/B matmuls       matmuls with a dimension r
    LM head                matmuls with a dimension V (logits, and their backward)
    log-softmax / softmax over the vocabulary   and their backward, gather, logsumexp (shapes with V)
    other [.., V] ops      elementwise ops, copies, casts and slices on vocabulary-sized tensors
    value / score head     matmuls with an output of 1
    attention              scaled-dot-product attention and its backward
    Adam step, zero_grad   inside `Optimizer.step` / `Optimizer.zero_grad`
    other ops              norms, activations, LoRA's scaling and add, embedding, everything else
    outside ops            wall time in no op at all: Python, dispatch, and the profiler's own overhead
"""

from __future__ import annotations

import statistics
import time

import torch

from .floor import StepShape, synchronize

BUCKETS = ("base linear layers", "LoRA A/B matmuls", "LM head", "log-softmax / softmax over the vocabulary",
           "other [.., V] ops", "value / score head", "attention", "Adam step", "zero_grad", "other ops")
MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm")
SOFTMAX = ("softmax", "logsumexp", "gather", "scatter")


class MinibatchWindow:
    """Optimizer-step hook: clock (and optionally profile) `minibatches` steps after the first of a run."""

    def __init__(self, device: torch.device, minibatches: int, profile: bool):
        self.device, self.minibatches, self.profile = device, minibatches, profile
        self.ends, self.optimizer, self.profiler = [], None, None

    def __enter__(self):
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self.handle = register_optimizer_step_post_hook(self._after_step)
        return self

    def __exit__(self, *exc):
        self.handle.remove()
        if self.profiler is not None and len(self.ends) <= self.minibatches:
            self.profiler.stop()  # the run had fewer steps than asked for

    def _after_step(self, optimizer, args, kwargs):
        if self.optimizer is None:
            self.optimizer = optimizer  # a critic with an optimizer of its own must not count twice
        if optimizer is not self.optimizer or len(self.ends) > self.minibatches:
            return
        synchronize(self.device)
        self.ends.append(time.perf_counter())
        if self.profile and len(self.ends) == 1:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=activities, record_shapes=True)
            self.profiler.start()
        elif self.profile and len(self.ends) == self.minibatches + 1:
            self.profiler.stop()

    @property
    def seconds_per_minibatch(self):
        return (self.ends[-1] - self.ends[0]) / (len(self.ends) - 1) if len(self.ends) > 1 else None


def _dims(event) -> set:
    return {d for shape in (event.input_shapes or []) if isinstance(shape, (list, tuple)) for d in shape
            if isinstance(d, int)}


def _inside(event, prefix: str) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith(prefix):
            return True
        parent = parent.cpu_parent
    return False


def bucket_of(event, vocab: int, rank: int) -> str:
    """The bucket of one profiler event (see the module docstring)."""
    name, dims = event.name, _dims(event)
    if _inside(event, "Optimizer.step") or name.startswith("Optimizer.step"):
        return "Adam step"
    if _inside(event, "Optimizer.zero_grad") or name.startswith("Optimizer.zero_grad"):
        return "zero_grad"
    if "attention" in name or "sdpa" in name.lower():
        return "attention"
    if name in MATMULS:
        if vocab in dims:
            return "LM head"
        if rank in dims:
            return "LoRA A/B matmuls"
        if 1 in dims:
            return "value / score head"
        return "base linear layers"
    if vocab in dims:
        return ("log-softmax / softmax over the vocabulary" if any(word in name for word in SOFTMAX)
                else "other [.., V] ops")
    return "other ops"


def breakdown(profiler, wall_seconds: float, minibatches: int, vocab: int, rank: int, device: torch.device) -> dict:
    """Milliseconds per minibatch in each bucket, the wall time in no op, and the biggest ops of "other ops"."""
    attribute = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    buckets, calls, others = dict.fromkeys(BUCKETS, 0.0), dict.fromkeys(BUCKETS, 0), {}
    in_ops = 0.0
    for event in profiler.events():
        micros = float(getattr(event, attribute, 0.0) or 0.0)
        in_ops += float(event.self_cpu_time_total or 0.0)
        bucket = bucket_of(event, vocab, rank)
        calls[bucket] += 1  # op counts do not move when a busy machine slows a window down
        if micros <= 0:
            continue
        buckets[bucket] += micros
        if bucket == "other ops":
            others[event.name] = others.get(event.name, 0.0) + micros
    per_minibatch = {name: micros / 1000 / minibatches for name, micros in buckets.items()}
    # on a GPU the buckets are device time; what is not in any op is judged on the host's clock
    per_minibatch["outside ops"] = max(0.0, wall_seconds * 1000 - in_ops / 1000) / minibatches
    top = sorted(others.items(), key=lambda item: -item[1])[:8]
    return {"ms": per_minibatch, "calls": {name: count / minibatches for name, count in calls.items()},
            "other_ops_top_ms": {name: micros / 1000 / minibatches for name, micros in top}}


def _clocked(run_step, device: torch.device) -> float:
    """Seconds per minibatch over every optimizer step of one PPO step."""
    with MinibatchWindow(device, 10 ** 6, profile=False) as window:
        run_step()
    return window.seconds_per_minibatch


def _profiled(run_step, device: torch.device, minibatches: int, vocab: int, rank: int) -> dict:
    with MinibatchWindow(device, minibatches, profile=True) as window:
        run_step()
    counted = len(window.ends) - 1
    if window.profiler is None or counted < 1:
        return {"profiled_seconds_per_minibatch": None, "minibatches": 0, "ms_per_minibatch": None}
    wall = window.ends[-1] - window.ends[0]
    found = breakdown(window.profiler, wall, counted, vocab, rank, device)
    return {"profiled_seconds_per_minibatch": wall / counted, "minibatches": counted,
            "ms_per_minibatch": found["ms"], "ops_per_minibatch": found["calls"],
            "other_ops_top_ms": found["other_ops_top_ms"]}


def profile_minibatch(inputs: dict, shape: StepShape, precision: str = "fp32", device="cpu",
                      minibatches: int = 4, repeats: int = 3, learning_rate: float = 1e-5) -> dict:
    """Per-minibatch seconds (median of `repeats` interleaved steps) and the bucket breakdown, ours vs floor.

    Ours is the project's PPOTrainer on the MARL model with the shared value head, one `train()` step at a time.
    """
    from transformers import AutoConfig, AutoTokenizer

    from .floor import Floor
    from .layouts import left_padded, load_layout, policy_lora_config
    from .ratio import TrainerRunner

    device = torch.device(device)
    config = AutoConfig.from_pretrained(inputs["base"])
    vocab, rank = int(config.vocab_size), int(inputs["lora"]["r"])
    minibatches = min(minibatches, shape.ppo_epochs * shape.minibatches - 1)
    lora = policy_lora_config(inputs["lora"])
    prompt_ids, prompt_mask = left_padded(inputs["prompts"], inputs["pad_id"])
    floor = Floor(inputs["base"], inputs["reward_adapter"], lora, device, precision, pad_id=inputs["pad_id"],
                  learning_rate=learning_rate)
    model = load_layout("marl", "fp32", inputs, device).model
    ours = TrainerRunner(model, AutoTokenizer.from_pretrained(inputs["base"]), shape, precision, device, learning_rate)
    queries = [torch.tensor(p, device=device) for p in inputs["prompts"]]
    steps = {"floor": lambda: floor.step(prompt_ids, prompt_mask, shape), "marl": lambda: ours.step(queries)}
    for run_step in steps.values():
        run_step()  # warm-up: allocators, kernels, caches
    with torch.profiler.profile():  # the profiler's own first start is slow: not in anyone's window
        torch.zeros(1).add_(1)
    clocked = {name: [] for name in steps}
    for _ in range(repeats):
        for name, run_step in steps.items():
            clocked[name].append(_clocked(run_step, device))
    result = {name: {"seconds_per_minibatch": statistics.median(clocked[name]), "clocked": clocked[name],
                     **_profiled(run_step, device, minibatches, vocab, rank)} for name, run_step in steps.items()}
    result.update({"shape": shape.as_dict(), "precision": precision, "device": str(device), "vocab": vocab,
                   "lora_rank": rank, "buckets": list(BUCKETS) + ["outside ops"], "window_minibatches": minibatches,
                   "threads": torch.get_num_threads()})
    floor_s, ours_s = result["floor"]["seconds_per_minibatch"], result["marl"]["seconds_per_minibatch"]
    result["ratio"] = ours_s / floor_s if floor_s and ours_s else None
    return result


def format_profile(profiled: dict) -> str:
    """The breakdown side by side: ms per minibatch, ours - floor."""
    floor, ours = profiled["floor"], profiled["marl"]
    shape = profiled["shape"]
    lines = [f"one training minibatch ({shape['mini_batch_size']} rollouts, from one optimizer step to the next; "
             f"median of {len(ours['clocked'])} interleaved PPO steps): ours "
             f"{1000 * (ours['seconds_per_minibatch'] or 0):.1f} ms, floor "
             f"{1000 * (floor['seconds_per_minibatch'] or 0):.1f} ms by the clock"
             + (f" ({profiled['ratio']:.2f}x)" if profiled.get("ratio") else ""),
             f"  under the profiler ({profiled['window_minibatches']} minibatches), per minibatch:"
             f"{'ms ours':>11}{'floor':>9}{'ours-floor':>12}{'ops ours':>10}{'floor':>8}"]
    if not (floor["ms_per_minibatch"] and ours["ms_per_minibatch"]):
        return "\n".join(lines + ["  (no profile: the step ran fewer optimizer steps than the window)"])
    for bucket in profiled["buckets"]:
        a, b = ours["ms_per_minibatch"][bucket], floor["ms_per_minibatch"][bucket]
        ops = "".join(f"{run['ops_per_minibatch'][bucket]:>{w}.0f}" for run, w in ((ours, 10), (floor, 8))) \
            if bucket in ours["ops_per_minibatch"] else ""
        lines.append(f"  {bucket:<52}{a:>11.1f}{b:>9.1f}{a - b:>+12.1f}{ops}")
    a, b = (sum(run["ms_per_minibatch"].values()) for run in (ours, floor))
    ops = "".join(f"{sum(run['ops_per_minibatch'].values()):>{w}.0f}" for run, w in ((ours, 10), (floor, 8)))
    lines.append(f"  {'sum':<52}{a:>11.1f}{b:>9.1f}{a - b:>+12.1f}{ops}")
    top = ", ".join(f"{name} {ms:.1f}" for name, ms in list(ours.get("other_ops_top_ms", {}).items())[:5])
    lines.append(f"  ours' biggest 'other ops' (ms): {top}")
    return "\n".join(lines)

