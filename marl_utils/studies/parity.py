"""Does one base learn as well as four models? PPO on each layout over several seeds (issue 21, `scripts/parity.py`).

Every layout trains the same `PPOTrainer` from the same SFT model and reward adapter, with the same prompts and
seeds; only where the weights live (and in what precision) changes:

| layout               | the model                                                                        |
|----------------------|----------------------------------------------------------------------------------|
| `separate fp32`      | policy LoRA on its own copy of the base, `ref_model=` a frozen copy, the reward LoRA |
|                      | merged into a sequence classifier (`separate_layout.py`): the baseline          |
| `one base fp32`      | one base: policy adapter, reference = adapters off, reward adapter on the same base |
| `one base 8-bit`     | the same on an 8-bit base (`load_in_8bit=True`)                                  |
| `one base 4-bit nf4` | the same on a 4-bit NormalFloat base                                             |
| `one base 4-bit fp4` | the same on a 4-bit float base (bitsandbytes' default for `load_in_4bit=True`)   |
| `critic adapter`     | one base fp32 with the value function on a critic adapter of its own             |

A run records, per PPO step, the proxy score (the reward adapter's, what PPO optimises) and the gold score (the
corpus grammar's true sentiment, `gold_reward.py`) of the same rollouts, and the KL; on held-out prompts before
and after training: proxy, gold, KL and distinct-2. `compare` puts each layout beside the separate one: mean ± sd
over seeds and the difference of the means with a Welch 95% interval.
"""

from __future__ import annotations

import math
import statistics
import time

from ..infra.errors import MarlInputError

BASELINE = "separate fp32"
LAYOUTS: dict[str, dict] = {
    BASELINE: {"separate": True},
    "one base fp32": {},
    "one base 8-bit": {"quantization": "8bit"},
    "one base 4-bit nf4": {"quantization": "nf4"},
    "one base 4-bit fp4": {"quantization": "fp4"},
    "critic adapter": {"critic": "adapter"},
}
METRICS = ("proxy gain", "gold gain", "final KL", "distinct-2")
"""The numbers of a run `compare` tests (held-out prompts, after training minus before for the gains)."""


def check_layouts(names) -> list[str]:
    """The names, in order, or a MarlInputError naming the unknown ones (before any model loads)."""
    names = list(names)
    unknown = [n for n in names if n not in LAYOUTS]
    if unknown or not names:
        raise MarlInputError(f"unknown layout(s) {unknown or names}; choose from {list(LAYOUTS)}")
    return names


def _quantization_config(kind: str | None):
    if kind is None:
        return None
    from transformers import BitsAndBytesConfig

    from ..model.quantization import require_bitsandbytes

    require_bitsandbytes(f"the {kind} layout")
    if kind == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind)


def build_trainer(layout: str, sft_dir, reward_dir, lora_config, config):
    """A PPOTrainer for `layout` (a key of LAYOUTS); the policy adapter's initialisation is seeded with config.seed,
    so every layout built with one config starts from the same policy."""
    import torch
    from transformers import AutoTokenizer

    from ..model.multi_adapter_model import AutoModelForCausalLMWithValueHead
    from ..ppo.trainer import PPOTrainer

    spec = LAYOUTS[check_layouts([layout])[0]]
    tokenizer = AutoTokenizer.from_pretrained(str(sft_dir))
    tokenizer.padding_side = "left"
    torch.manual_seed(config.seed)
    if spec.get("separate"):
        from ..bench.separate_layout import build_separate_trainer

        return build_separate_trainer(config, sft_dir, reward_dir, tokenizer, lora_config, seed=config.seed)
    kwargs = {"critic": spec["critic"]} if "critic" in spec else {}
    quantization = _quantization_config(spec.get("quantization"))
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    model = AutoModelForCausalLMWithValueHead.from_pretrained(str(sft_dir), peft_config=lora_config,
                                                              reward_adapter=str(reward_dir), **kwargs)
    return PPOTrainer(config, model=model, tokenizer=tokenizer)


class GoldRecorder:
    """Adds the gold score of each training step's rollouts to the step's history entry (`env/gold_mean`).

    The trainer's loop does not hand its rollouts to a callback, so this wraps `trainer.generate` to keep the
    last batch it produced; the callback then scores prompt + response with `gold_fn` (texts -> scores).
    """

    def __init__(self, trainer, gold_fn):
        self.trainer, self.gold_fn, self.last = trainer, gold_fn, None
        generate = trainer.generate

        def recording_generate(queries, *args, **kwargs):
            responses = generate(queries, *args, **kwargs)
            self.last = (queries, responses)
            return responses

        trainer.generate = recording_generate

    def texts(self, queries, responses) -> list[str]:
        """prompt + response decoded together, as `evaluate` decodes them for its gold score"""
        import torch

        from ..ppo.evaluation import decode_text

        return [decode_text(self.trainer.tokenizer, torch.cat([q.cpu(), r.cpu()])) for q, r in zip(queries, responses)]

    def __call__(self, trainer, entry) -> None:
        if self.last is None:
            return
        gold = self.gold_fn(self.texts(*self.last))
        entry["env/gold_mean"] = float(sum(gold) / len(gold))
        self.last = None


def run_layout(layout: str, sft_dir, reward_dir, lora_config, config, prompts, eval_prompts, gold_fn,
               *, steps_per_eval: int = 0, progress: bool = False) -> dict:
    """One PPO run of `layout`: a summary row (the METRICS and more) and its per-step curves."""
    start = time.perf_counter()
    trainer = build_trainer(layout, sft_dir, reward_dir, lora_config, config)
    before = trainer.evaluate(eval_prompts, gold_reward=gold_fn)
    recorder = GoldRecorder(trainer, gold_fn)
    trainer.train(prompts, steps=config.steps, callback=recorder, progress=progress)
    after = trainer.evaluate(eval_prompts, gold_reward=gold_fn)
    curves = {key: [float(row[key]) for row in trainer.history]
              for key in ("env/score_mean", "env/gold_mean", "objective/kl", "ppo/response_tokens_mean")}
    return {
        "layout": layout, "seed": config.seed, "steps": config.steps, "batch": config.batch_size,
        "proxy before": before["reward_mean"], "proxy after": after["reward_mean"],
        "proxy gain": after["reward_mean"] - before["reward_mean"],
        "gold before": before["gold_mean"], "gold after": after["gold_mean"],
        "gold gain": after["gold_mean"] - before["gold_mean"],
        "final KL": after["kl_mean"], "distinct-2": after["distinct_2"],
        "response tokens": after["response_tokens_mean"],
        "seconds": time.perf_counter() - start,
        "samples": after["samples"], "curves": curves,
    }


# ---------------------------------------------------------------------------------------------- statistics
def _student_t_log_density_constant(df: float) -> float:
    return math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)


def _student_t_density(t: float, df: float, log_c: float) -> float:
    return math.exp(log_c - (df + 1) / 2 * math.log1p(t * t / df))


def _student_t_cdf(x: float, df: float) -> float:
    """P(T <= x) for Student's t with `df` degrees of freedom (Simpson's rule on the density; |x| < ~40)."""
    if x < 0:
        return 1.0 - _student_t_cdf(-x, df)
    log_c = _student_t_log_density_constant(df)
    n = 400  # even; the density is smooth, so Simpson's rule is exact to ~1e-7 over the range used here
    h = x / n
    total = sum((1 if i in (0, n) else (4 if i % 2 else 2)) * _student_t_density(i * h, df, log_c) for i in range(n + 1))
    return 0.5 + total * h / 3


def student_t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t (Newton's method on the CDF, kept inside a bracket): 2.776 for p=0.975, df=4."""
    if not 0.5 <= p < 1 or df <= 0:
        raise MarlInputError(f"student_t_quantile(p={p}, df={df}): need 0.5 <= p < 1 and df > 0")
    log_c = _student_t_log_density_constant(df)
    lo, hi = 0.0, 2.0
    while _student_t_cdf(hi, df) < p:
        lo, hi = hi, 2 * hi
    x = (lo + hi) / 2
    for _ in range(100):
        error = _student_t_cdf(x, df) - p
        lo, hi = (x, hi) if error < 0 else (lo, x)
        step = error / _student_t_density(x, df, log_c)
        x = x - step if lo < x - step < hi else (lo + hi) / 2  # a Newton step that leaves the bracket: bisect
        if abs(step) < 1e-10 or hi - lo < 1e-10:
            break
    return x


def welch_interval(a, b, level: float = 0.95) -> tuple[float, float, float]:
    """mean(a) - mean(b) and its Welch `level` interval (unequal variances; Welch-Satterthwaite df)."""
    a, b = [float(x) for x in a], [float(x) for x in b]
    if len(a) < 2 or len(b) < 2:
        raise MarlInputError(f"a Welch interval needs at least 2 values per group (got {len(a)} and {len(b)}); "
                             "run more seeds")
    diff = statistics.fmean(a) - statistics.fmean(b)
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return diff, diff, diff
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    half = student_t_quantile(0.5 + level / 2, df) * se
    return diff, diff - half, diff + half


def compare(rows: list[dict], baseline: str = BASELINE, metrics=METRICS) -> list[dict]:
    """One row per layout: (mean, sd) of each metric, and for each layout but the baseline the difference to it
    with a Welch 95% interval, and a one-line verdict."""
    layouts = list(dict.fromkeys(row["layout"] for row in rows))
    if baseline not in layouts:
        raise MarlInputError(f"no run of the baseline layout {baseline!r}; the comparison needs it")
    by_layout = {name: [row for row in rows if row["layout"] == name] for name in layouts}
    table = []
    for name in layouts:
        runs = by_layout[name]
        out = {"layout": name, "seeds": len(runs)}
        for key in metrics:
            values = [float(row[key]) for row in runs]
            out[key] = (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0)
            if name != baseline and len(runs) > 1 and len(by_layout[baseline]) > 1:
                out[f"{key} diff"] = welch_interval(values, [float(r[key]) for r in by_layout[baseline]])
        out["verdict"] = "baseline" if name == baseline else verdict(out, metrics)
        table.append(out)
    return table


def verdict(row: dict, metrics=METRICS) -> str:
    """'no difference detected at this n', or which metrics' 95% intervals exclude 0, and in which direction."""
    if not any(f"{key} diff" in row for key in metrics):
        return "too few seeds to compare (need 2 per layout)"
    differs = []
    for key in metrics:
        diff, lo, hi = row[f"{key} diff"]
        if lo > 0 or hi < 0:
            differs.append(f"{key} {'higher' if diff > 0 else 'lower'} by {abs(diff):.2f} [{lo:+.2f}, {hi:+.2f}]")
    if not differs:
        return f"no difference detected at this n ({row['seeds']} seeds)"
    return "differs: " + "; ".join(differs)


def format_table(table: list[dict], metrics=METRICS) -> str:
    """Markdown: mean ± sd per metric, the difference to the baseline [95% interval], the verdict."""
    head = ["layout", "seeds"] + [f"{m}" for m in metrics] + [f"Δ {m} [95% CI]" for m in metrics] + ["verdict"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in table:
        cells = [row["layout"], str(row["seeds"])]
        cells += [f"{row[m][0]:.2f} ± {row[m][1]:.2f}" for m in metrics]
        for m in metrics:
            if f"{m} diff" in row:
                d, lo, hi = row[f"{m} diff"]
                cells.append(f"{d:+.2f} [{lo:+.2f}, {hi:+.2f}]")
            else:
                cells.append("–")
        cells.append(row["verdict"])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_parity(rows: list[dict], *, smooth: int = 3, save_to=None, title: str | None = None):
    """Proxy and gold score of the training rollouts per PPO step, mean over seeds with a ±1 sd band, per layout."""
    import matplotlib.pyplot as plt

    from ..display.plots import _save, _smooth

    panels = (("env/score_mean", "proxy reward (reward adapter)"), ("env/gold_mean", "gold reward (grammar)"),
              ("objective/kl", "KL to reference (nats per response)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.6), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    layouts = list(dict.fromkeys(row["layout"] for row in rows))
    for ax, (key, name) in zip(axes[0], panels):
        for color, layout in zip(colors, layouts):
            curves = [_smooth(row["curves"][key], smooth) for row in rows if row["layout"] == layout]
            n = min(len(c) for c in curves)
            mean = [statistics.fmean(c[i] for c in curves) for i in range(n)]
            sd = [statistics.stdev(c[i] for c in curves) if len(curves) > 1 else 0.0 for i in range(n)]
            steps = range(1, n + 1)
            ax.plot(steps, mean, color=color, label=f"{layout} (n={len(curves)})")
            ax.fill_between(steps, [m - s for m, s in zip(mean, sd)], [m + s for m, s in zip(mean, sd)],
                            color=color, alpha=0.15)
        ax.set_title(name)
        ax.set_xlabel("PPO step")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    if save_to:
        _save(fig, save_to)
    return fig
