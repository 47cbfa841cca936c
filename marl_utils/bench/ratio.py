"""Our PPO step as a ratio to the compute floor, floor and layouts interleaved in ONE process (issue 13).

    floor, marl, separate, critic, | critic, separate, marl, floor, | floor, marl, ...   (one step each)

Each repeat runs one PPO step of every runner, in alternating order, so a busy machine slows all of them
alike; the first repeat warms up and is dropped. Reported per phase (generate / score / rollout / optimise /
total): the median over the repeats, the ratio of medians ours / floor, and as noise the min-max of the
per-repeat ratios (ours in repeat r / floor in repeat r). The runners:

- floor: `bench_floor.Floor`, plain torch + peft, the least any implementation does;
- marl: the project's `PPOTrainer` on `AutoModelForCausalLMWithValueHead` (shared value head), one step of
  `train()` (`TrainerRunner`); phases from the trainer's own timers, the total from the clock around it;
- separate: the four-model layout of `bench_layouts` with the same PPO step (`timed_ppo_step`);
- critic_adapter: `PPOTrainer` on `from_pretrained(..., critic="adapter")` once that exists.

The floor and the separate layout force `new_tokens` tokens per response (`min_new_tokens`, a timing choice);
the trainer samples as it does in training, where a rare early EOS (random weights) leaves its batch as wide.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import io
import os
import statistics
import time
import warnings

import torch

from .floor import Floor, StepShape, synchronize

PHASES = ("generate", "score", "rollout", "optimise")
LAYOUTS = ("marl", "separate", "critic_adapter")
LABELS = {"floor": "floor: plain torch + peft", "marl": "MARL, shared value head",
          "separate": "separate models", "critic_adapter": "MARL, critic adapter"}
NOT_YET = "not available yet"
TRAINER_TIMERS = {"generate": "time/rollout/generate", "score": "time/rollout/score",
                  "rollout": "time/ppo/rollout_forward", "optimise": "time/ppo/optimize"}
"""Phase -> the trainer's timer in its history entry. No "time/rollout/score": the reward pass is fused into the
rollout forward, and that runner's rollout is compared with the floor's score + rollout."""


def critic_adapter_supported(model_class=None) -> bool:
    """Whether `from_pretrained` takes `critic=` (issue 14), read from its signature."""
    if model_class is None:
        from ..model.multi_adapter_model import AutoModelForCausalLMWithValueHead as model_class
    try:
        parameters = inspect.signature(model_class.from_pretrained).parameters
    except (TypeError, ValueError):
        return False
    return "critic" in parameters


@contextlib.contextmanager
def _accelerate_on(device: torch.device):
    # Accelerate puts the trainer on the GPU whenever there is one; --device cpu must keep it on the CPU.
    forced = device.type == "cpu" and torch.cuda.is_available()
    before = os.environ.get("ACCELERATE_USE_CPU")
    if forced:
        os.environ["ACCELERATE_USE_CPU"] = "true"
    try:
        yield
    finally:
        if forced and before is None:
            os.environ.pop("ACCELERATE_USE_CPU", None)
        elif forced:
            os.environ["ACCELERATE_USE_CPU"] = before


class TrainerRunner:
    """The project's PPOTrainer on a model: one step = `train()` for one more step, as a user runs it.

    `train()` is what users run, and it is where the trainer's own choices live (how many rows it generates at
    once, whether the reward pass is fused into the rollout forward), so the bench times it rather than
    rebuilding a step from `generate` / `score` / `step`. Phases come from the trainer's history entry; the
    total is the clock around the call. Sampling is plain (no `min_new_tokens`), so a response may end early
    at EOS: each step records the mean response length it really had (`response_tokens`).
    """

    def __init__(self, model, tokenizer, shape: StepShape, precision: str, device, learning_rate: float):
        from ..ppo.trainer import PPOTrainer
        from ..ppo.config import PPOConfig

        settings = dict(batch_size=shape.batch, mini_batch_size=shape.mini_batch_size, ppo_epochs=shape.ppo_epochs,
                        max_new_tokens=shape.new_tokens, learning_rate=learning_rate, adap_kl_ctrl=False,
                        init_kl_coef=0.05)
        if "mixed_precision" in {field.name for field in dataclasses.fields(PPOConfig)}:
            settings["mixed_precision"] = "bf16" if precision == "bf16" else "no"
        self.shape, self.device = shape, torch.device(device)
        with _accelerate_on(self.device):
            self.trainer = PPOTrainer(PPOConfig(**settings), model=model, tokenizer=tokenizer)
        # what the trainer really runs in: a trainer that ignores mixed_precision runs fp32
        self.precision_used = str(getattr(self.trainer.accelerator, "mixed_precision", "no"))

    def _clock(self) -> float:
        synchronize(self.device)
        return time.perf_counter()

    def step(self, queries) -> dict:
        trainer = self.trainer
        start = self._clock()
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):  # its one-line summary
            warnings.simplefilter("ignore")
            history = trainer.train(prompts=queries, steps=trainer.step_count + 1, progress=False)
        done = self._clock()
        entry = history[-1]
        phases = {phase: (float(entry[key]) if entry.get(key) is not None else None)
                  for phase, key in TRAINER_TIMERS.items()}
        phases.update({"total": done - start, "response_tokens": float(entry.get("ppo/response_tokens_mean", 0.0)),
                       "ppo_epochs": float(entry.get("ppo/epochs", self.shape.ppo_epochs))})
        return phases


class LayoutRunner:
    """A `bench_layouts` layout with the bench's own PPO step (the separate-models layout)."""

    def __init__(self, layout, shape: StepShape, precision: str, learning_rate: float):
        self.layout, self.shape, self.precision = layout, shape, precision
        self.optimizer = torch.optim.Adam(layout.trainable_parameters(), lr=learning_rate)

    def step(self, prompt_ids, prompt_mask) -> dict:
        from .layouts import timed_ppo_step

        return timed_ppo_step(self.layout, prompt_ids, prompt_mask, self.shape, self.optimizer, self.precision)


def _median(steps: list, key: str):
    values = [s[key] for s in steps if s.get(key) is not None]
    return statistics.median(values) if len(values) == len(steps) and values else None


def summarise_runs(runs: dict) -> dict:
    """Medians per runner and phase; ours / floor per phase (ratio of medians) and the per-repeat total ratios.

    "other" is the median over the steps of total - the phases (input checks, statistics, glue). A runner
    whose reward pass is inside its rollout forward (no score timer) has its rollout compared with the floor's
    score + rollout, and "score_in_rollout" set.
    """
    medians = {}
    for name, steps in runs.items():
        fused = all(s.get("score") is None for s in steps) and all(s.get("rollout") is not None for s in steps)
        row = {key: _median(steps, key) for key in (*PHASES, "total")}
        rest = [s["total"] - sum(s[p] or 0.0 for p in PHASES) for s in steps]
        row["other"] = statistics.median(rest) if rest else None
        row["score_in_rollout"] = fused
        medians[name] = row
    floor = medians["floor"]
    ratios = {}
    for name, row in medians.items():
        if name == "floor":
            continue
        pair = [ours["total"] / base["total"] for ours, base in zip(runs[name], runs["floor"])]
        ratios[name] = {key: (row[key] / floor[key] if row[key] is not None and floor[key] else None)
                        for key in (*PHASES, "total")}
        if row["score_in_rollout"] and floor["score"] is not None:
            ratios[name]["rollout"] = row["rollout"] / (floor["score"] + floor["rollout"])
        ratios[name].update({"total_pairs": pair, "total_pair_min": min(pair), "total_pair_max": max(pair),
                             "score_in_rollout": row["score_in_rollout"]})
    return {"median_seconds": medians, "ratios": ratios}


def compare_to_floor(inputs: dict, shape: StepShape, *, precision: str = "fp32", device="cpu", steps: int = 5,
                     layouts=LAYOUTS, time_budget: float | None = None, learning_rate: float = 1e-5,
                     log=None) -> dict:
    """Load the floor and each layout once, run 1 + `steps` interleaved repeats; the figures of every step.

    `inputs`: what `bench_layouts.prepare_bench_models` returns. `time_budget` (seconds, loading included):
    stop after the repeat that would run past it, once at least 2 repeats are timed (noted in the result).
    """
    from transformers import AutoTokenizer

    from .layouts import left_padded, load_layout, policy_lora_config

    log = log or (lambda message: print(message, flush=True))
    began = time.perf_counter()
    device = torch.device(device)
    lora = policy_lora_config(inputs["lora"])
    prompt_ids, prompt_mask = left_padded(inputs["prompts"], inputs["pad_id"])
    queries = [torch.tensor(p, device=device) for p in inputs["prompts"]]
    tokenizer = AutoTokenizer.from_pretrained(inputs["base"])
    runners, notes = {}, {}
    floor = Floor(inputs["base"], inputs["reward_adapter"], lora, device, precision, pad_id=inputs["pad_id"],
                  learning_rate=learning_rate)
    runners["floor"] = lambda: floor.step(prompt_ids, prompt_mask, shape)
    precision_used = {"floor": precision}
    if "marl" in layouts:
        marl = TrainerRunner(load_layout("marl", "fp32", inputs, device).model, tokenizer, shape, precision, device,
                             learning_rate)
        runners["marl"], precision_used["marl"] = (lambda: marl.step(queries)), marl.precision_used
    if "separate" in layouts:
        separate = LayoutRunner(load_layout("separate", "fp32", inputs, device), shape, precision, learning_rate)
        runners["separate"], precision_used["separate"] = (lambda: separate.step(prompt_ids, prompt_mask)), precision
    if "critic_adapter" in layouts:
        if critic_adapter_supported():
            try:
                critic = TrainerRunner(_critic_adapter_model(inputs, lora, device), tokenizer, shape, precision,
                                       device, learning_rate)
                runners["critic_adapter"] = lambda: critic.step(queries)
                precision_used["critic_adapter"] = critic.precision_used
            except Exception as err:  # a critic mid-change must not cost the other figures
                notes["critic_adapter"] = f"failed to load: {type(err).__name__}: {err}"[:300]
        else:
            notes["critic_adapter"] = (f"{NOT_YET}: AutoModelForCausalLMWithValueHead.from_pretrained has no "
                                       "critic= argument")
    loaded = time.perf_counter()
    log(f"bench: floor comparison, {', '.join(runners)} loaded in {loaded - began:.0f} s; "
        f"{steps} timed repeats after a warm-up ...")

    names = list(runners)
    runs = {name: [] for name in names}
    stopped_early = False
    for repeat in range(steps + 1):
        started = time.perf_counter()
        for name in (names if repeat % 2 == 0 else names[::-1]):
            result = runners[name]()
            if repeat > 0:  # repeat 0 warms up allocators, kernels and caches
                runs[name].append(result)
        took = time.perf_counter() - started
        log(f"bench: repeat {repeat}/{steps}{' (warm-up)' if repeat == 0 else ''} took {took:.1f} s")
        timed = repeat
        if (time_budget is not None and timed >= 2 and repeat < steps
                and time.perf_counter() + took > began + time_budget):
            stopped_early = True
            notes["budget"] = f"stopped after {timed} of {steps} timed repeats: the next would pass {time_budget} s"
            break
    result = {"shape": shape.as_dict(), "precision": precision, "precision_used": precision_used,
              "device": str(device), "threads": torch.get_num_threads(), "steps_requested": steps,
              "steps": len(runs["floor"]), "stopped_by_budget": stopped_early, "load_seconds": loaded - began,
              "seconds": time.perf_counter() - began, "steps_detail": runs, "notes": notes,
              "unavailable": {name: note for name, note in notes.items() if name in LAYOUTS}}
    result.update(summarise_runs(runs))
    return result


def _critic_adapter_model(inputs: dict, lora, device):
    from .layouts import _quiet_load
    from ..model.multi_adapter_model import AutoModelForCausalLMWithValueHead

    model = _quiet_load(AutoModelForCausalLMWithValueHead.from_pretrained, inputs["base"], peft_config=lora,
                        reward_adapter=inputs["reward_adapter"], critic="adapter", dtype=torch.float32)
    return model.to(device).eval()


def format_ratio_table(comparison: dict) -> str:
    """The printed ratios: floor seconds per phase, then each layout as a multiple of them."""
    shape, medians, ratios = comparison["shape"], comparison["median_seconds"], comparison["ratios"]
    lines = [f"ours / compute floor ({comparison['precision']} on {comparison['device']}, "
             f"{comparison['threads']} thread(s), batch {shape['batch']}, {shape['new_tokens']} new tokens, "
             f"{shape['ppo_epochs']} epochs x {shape['minibatches']} minibatches; medians of "
             f"{comparison['steps']} interleaved steps)"]
    head = f"{'':<27}" + "".join(f"{p:>10}" for p in (*PHASES, "total")) + "   per-step total ratio"
    lines += [head, "-" * len(head)]
    lines.append(f"{LABELS['floor'] + ' (s)':<27}" + "".join(
        f"{medians['floor'][p]:>10.3f}" for p in (*PHASES, "total")))

    def cell(value):
        return f"{value:>9.2f}x" if value is not None else f"{'-':>10}"

    for name in LAYOUTS:
        if name in ratios:
            row = ratios[name]
            used = comparison["precision_used"].get(name)
            flag = "" if used in (comparison["precision"], None) or (used == "no" and comparison["precision"] ==
                                                                      "fp32") else f"  (ran in {used})"
            cells = [cell(row[p]) if not (p == "score" and row["score_in_rollout"]) else f"{'in rollout':>10}"
                     for p in (*PHASES, "total")]
            lines.append(f"{LABELS[name]:<27}" + "".join(cells)
                         + f"   {row['total_pair_min']:.2f}-{row['total_pair_max']:.2f}{flag}")
            short = [s["response_tokens"] for s in comparison["steps_detail"][name]
                     if s.get("response_tokens", shape["new_tokens"]) < shape["new_tokens"]]
            if short:
                lines.append(f"{'':<27}  ({len(short)} step(s) with responses ended at EOS: fewer tokens)")
        elif name in comparison["unavailable"]:
            lines.append(f"{LABELS[name]:<27}  {comparison['unavailable'][name]}")
    if any(row["score_in_rollout"] for row in ratios.values()):
        lines.append("in rollout: the trainer scores with the reward adapter inside its rollout forward; its rollout "
                     "ratio is to the floor's score + rollout")
    if comparison["notes"].get("budget"):
        lines.append(f"note: {comparison['notes']['budget']}")
    return "\n".join(lines)


def plot_ratios(ax, comparison: dict, title: str = "") -> None:
    """Grouped bars: each layout's ratio to the floor per phase, a line at 1.0 (the floor)."""
    ratios = comparison["ratios"]
    names = [name for name in LAYOUTS if name in ratios]
    keys = (*PHASES, "total")
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        xs = [k + (i - (len(names) - 1) / 2) * width for k in range(len(keys))]
        values = [ratios[name][key] for key in keys]
        bars = ax.bar(xs, [v or 0.0 for v in values], width=width, label=LABELS[name])
        # no score timer: the reward pass ran inside the rollout forward, whose bar holds both
        ax.bar_label(bars, labels=[f"{v:.2f}" if v is not None else "in rollout" for v in values], fontsize=6,
                     rotation=90, padding=2)
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--", label="compute floor")
    ax.set_xticks(range(len(keys)), keys)
    ax.set_ylabel("seconds / floor's seconds (median)")
    top = max([1.0] + [ratios[n][k] or 0.0 for n in names for k in keys])
    ax.set_ylim(0, top * 1.35)
    ax.set_title(title or f"PPO step / compute floor ({comparison['precision']}, {comparison['device']})")
    ax.legend(fontsize=7, loc="upper left")
