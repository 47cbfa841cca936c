"""The critic comparison of notebook 06 (marl_utils.display.critic_report): rows, seed tables, bytes, the figure, one run."""

import os
import statistics

import pytest
import torch
from peft import LoraConfig
from stand_ins import LORA_TARGETS, make_reward_adapter, make_tiny_llama, make_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from marl_utils.display import critic_report
from marl_utils.display.critic_report import (CONTROLS, CRITICS, CriticRun, build_trainer, critic_bytes, critic_kwargs,
                                      format_seed_table, plot_critics, run_critics, seconds_per_step, seed_table,
                                      summarize, train_side_by_side, window_mean)
from marl_utils.infra.errors import MarlInputError
from marl_utils.model.multi_adapter_model import AutoModelForCausalLMWithValueHead
from marl_utils.display.notebook_helpers import storage_bytes
from marl_utils.ppo.config import PPOConfig

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
HIDDEN = 32
REWARD_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
CONTROL = "fresh critic, reward's shape"


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("critic_report")
    base = make_tiny_llama(root / "base", hidden=HIDDEN)
    # a reward adapter of another shape than the policy's LoRA (rank 8 on four projections, the policy: 4 on two)
    return base, make_reward_adapter(base, root / "rm", r=8, target_modules=REWARD_TARGETS)


def lora(r=4):
    return LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=LORA_TARGETS["llama"],
                      task_type="CAUSAL_LM")


def history(values: dict, n: int):
    """A fake trainer history of `n` steps: key -> function of the step."""
    return [{"step": i + 1, **{k: f(i) for k, f in values.items()}} for i in range(n)]


def test_critic_kwargs_are_the_three_from_pretrained_choices():
    assert critic_kwargs("shared head") == {"critic": "head"}
    assert critic_kwargs("critic from reward") == {"critic": "adapter", "critic_init": "reward_adapter"}
    critic_kwargs("critic adapter")["critic"] = "changed"  # a copy: the table itself cannot be edited by a caller
    assert CRITICS["critic adapter"] == {"critic": "adapter"}
    with pytest.raises(MarlInputError, match="unknown critic 'value model'; choose one of"):
        critic_kwargs("value model")
    with pytest.raises(MarlInputError, match="pass reward_dir"):
        critic_kwargs(CONTROL)


def test_the_control_is_a_fresh_critic_with_the_reward_adapters_lora_shape(paths):
    _, rm = paths
    kwargs = critic_kwargs(CONTROL, rm)
    assert kwargs["critic"] == "adapter" and "critic_init" not in kwargs
    lora_config = kwargs["critic_peft_config"]
    assert (lora_config.r, lora_config.lora_alpha, sorted(lora_config.target_modules)) == (8, 16, sorted(REWARD_TARGETS))
    assert getattr(lora_config.task_type, "value", lora_config.task_type) == "CAUSAL_LM"  # a causal-LM adapter


def test_window_mean_reads_first_and_last_steps_that_record_the_key():
    h = history({"ppo/loss/value": lambda i: float(i)}, 20) + [{"step": 21, "eval/reward_mean": 3.0}]
    assert window_mean(h, "ppo/loss/value", 5, "first") == 2.0          # 0..4
    assert window_mean(h, "ppo/loss/value", 5, "last") == 17.0          # 15..19; step 21 has no value loss
    assert window_mean(h, "ppo/loss/value", 50) == 9.5                   # a window longer than the run: all steps
    with pytest.raises(MarlInputError, match="no step of this history records 'objective/kl'"):
        window_mean(h, "objective/kl", 5)
    with pytest.raises(MarlInputError, match="at least 1"):
        window_mean(h, "ppo/loss/value", 0)
    with pytest.raises(MarlInputError, match="'first' or 'last'"):
        window_mean(h, "ppo/loss/value", 3, "middle")


def test_seconds_per_step_is_the_median_of_generation_plus_ppo_step():
    h = history({"time/rollout/generate": lambda i: 1.0, "time/ppo/total": lambda i: [0.5, 9.0, 0.7][i]}, 3)
    assert seconds_per_step(h) == pytest.approx(1.7)  # the slow 10 s step does not move the median
    with pytest.raises(MarlInputError, match="no step of this history has timings"):
        seconds_per_step([{"step": 1, "ppo/loss/value": 1.0}])


def fake_run(label, seed, gain, loss0):
    h = history({"ppo/loss/value": lambda i: loss0 / (i + 1), "ppo/val/explained_variance": lambda i: i / 10,
                 "time/rollout/generate": lambda i: 0.2, "time/ppo/total": lambda i: 0.3}, 10)
    return CriticRun(label, h, {"reward_mean": -1.0, "kl_mean": 0.0}, {"reward_mean": -1.0 + gain, "kl_mean": 4.0},
                     critic_bytes=1024, base_bytes=4096, seed=seed)


def test_summarize_and_seed_table_give_mean_and_sd_per_critic():
    runs = [fake_run("shared head", s, g, 2.0) for s, g in enumerate([1.0, 2.0, 4.0])] + \
           [fake_run("critic adapter", s, g, 1.0) for s, g in enumerate([3.0, 3.5])]
    rows = [summarize(run, window=2) for run in runs]
    assert rows[0]["reward gain"] == 1.0 and rows[0]["final KL"] == 4.0
    assert rows[0]["value loss first"] == pytest.approx((2.0 + 1.0) / 2)
    assert rows[0]["value loss last"] == pytest.approx((2.0 / 9 + 2.0 / 10) / 2)
    assert rows[0]["expl. var. last"] == pytest.approx(0.85) and rows[0]["s/step"] == pytest.approx(0.5)
    assert rows[0]["critic KiB"] == 1.0 and rows[0]["critic / base"] == 0.25
    table = seed_table(rows)
    assert [row["critic"] for row in table] == ["shared head", "critic adapter"]  # first-seen order
    assert [row["seeds"] for row in table] == [3, 2]
    assert table[0]["reward gain"] == pytest.approx((statistics.mean([1, 2, 4]), statistics.stdev([1, 2, 4])))
    assert table[1]["reward gain"] == pytest.approx((3.25, statistics.stdev([3.0, 3.5])))
    text = format_seed_table(table, ["reward gain", "s/step"])
    assert text.splitlines()[0] == "| critic | seeds | reward gain | s/step |"
    assert "| shared head | 3 | 2.33 ± 1.53 | 0.500 ± 0.000 |" in text
    with pytest.raises(MarlInputError, match="seed_table got no rows"):
        seed_table([])


def test_one_seed_has_sd_zero():
    table = seed_table([summarize(fake_run("critic from reward", 0, 2.0, 1.0), window=3)])
    assert table[0]["reward gain"] == (2.0, 0.0)


def test_critic_bytes_count_the_value_head_and_the_critic_lora(paths):
    from transformers import AutoModelForCausalLM

    base, rm = paths
    plain = AutoModelForCausalLM.from_pretrained(str(base))
    plain_bytes = storage_bytes([*plain.parameters(), *plain.buffers()])  # weights and rotary tables, once each
    sizes = {}
    for label in [*CRITICS, *CONTROLS]:
        model = AutoModelForCausalLMWithValueHead.from_pretrained(str(base), peft_config=lora(), reward_adapter=str(rm),
                                                                  **critic_kwargs(label, rm))
        head = (HIDDEN + 1) * 4  # Linear(hidden, 1) in float32
        lora_bytes = sum(p.numel() * p.element_size() for p in model.critic_parameters())
        assert (lora_bytes > 0) == (label != "shared head")
        sizes[label] = critic_bytes(model)
        assert sizes[label] == head + lora_bytes
        assert critic_report.base_bytes(model) == plain_bytes  # the base alone, whatever the critic
    # a fresh critic has the policy's LoRA shape (r=4 on q, v); the copy and the control the reward adapter's
    layers, policy_lora = 2, 2 * 4 * (HIDDEN + HIDDEN) * 4
    assert sizes["critic adapter"] == sizes["shared head"] + layers * policy_lora
    assert sizes["critic from reward"] == sizes[CONTROL] == sizes["shared head"] + layers * 4 * 8 * 2 * HIDDEN * 4


def test_plot_critics_draws_four_panels_and_writes_the_png_whole(tmp_path):
    runs = {label: fake_run(label, 0, 1.0, 1.0).history for label in CRITICS}
    for h in runs.values():
        for row in h:
            row.update({"env/score_mean": 0.5, "objective/kl": 1.0})
    runs["critic adapter"][0]["ppo/val/explained_variance"] = -40.0  # a fresh critic starts far below 0
    path = tmp_path / "figs" / "06_test.png"
    fig = plot_critics(runs, save_to=path)
    assert [ax.get_title() for ax in fig.axes] == [title for _, title in critic_report.CURVES]
    assert fig.axes[2].get_ylim() == (-1.0, 1.0)
    assert len(fig.axes[0].get_legend().get_texts()) == 3
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in path.parent.iterdir()] == ["06_test.png"]  # no temporary file left behind
    assert path.stat().st_mode & 0o044 == 0o044  # readable by everyone, unlike the temporary file it was


def tiny_prompts():
    tok = make_tokenizer()
    return [torch.tensor(tok(t, add_special_tokens=False)["input_ids"]) for t in
            ["the movie", "i loved this", "bad", "a wonderful film with", "it was"]]


def tiny_config(**kw):
    return PPOConfig(**{**dict(batch_size=4, mini_batch_size=2, ppo_epochs=1, learning_rate=1e-2, max_new_tokens=4,
                               steps=2, seed=3), **kw})


def comparable(history):
    """A history without its wall-clock timings (the only numbers that may differ between equal runs)."""
    return [{k: v for k, v in row.items() if not k.startswith("time/")} for row in history]


def test_side_by_side_runs_are_the_runs_each_trainer_makes_alone(paths):
    base, rm = paths
    prompts, config = tiny_prompts(), tiny_config(steps=3)
    alone = build_trainer("critic adapter", base, rm, lora(), config)
    alone.train(prompts, progress=False)
    trainers = {label: build_trainer(label, base, rm, lora(), config) for label in ("shared head", "critic adapter")}
    torch.rand(7)  # whatever the caller's random stream did before does not matter
    outside = torch.get_rng_state()
    histories = train_side_by_side(trainers, prompts, 3, progress=False)
    assert torch.equal(torch.get_rng_state(), outside)  # the caller's stream is given back untouched
    assert [len(h) for h in histories.values()] == [3, 3]
    assert comparable(histories["critic adapter"]) == comparable(alone.history)
    # the same seed, another critic: the first rollout is the same (same policy start, same samples), then they part
    first = {label: h[0]["env/score_mean"] for label, h in histories.items()}
    assert first["shared head"] == first["critic adapter"]
    with pytest.raises(MarlInputError, match="have already trained"):
        train_side_by_side(trainers, prompts, 4, progress=False)
    with pytest.raises(MarlInputError, match="at least 1 step"):
        train_side_by_side({}, prompts, 0, progress=False)


def test_run_critics_evaluates_before_and_after_training(paths):
    base, rm = paths
    prompts = tiny_prompts()
    runs = run_critics(["critic from reward"], base, rm, lora(), tiny_config(), prompts, prompts[:2])
    run = runs["critic from reward"]
    assert run.seed == 3 and len(run.history) == 2 and run.seconds > 0
    assert run.before["kl_mean"] == pytest.approx(0.0, abs=1e-5)  # a fresh policy adapter is the reference
    assert run.after["kl_mean"] != run.before["kl_mean"]
    row = summarize(run, window=1)
    assert row["critic KiB"] > 0 and row["s/step"] > 0
    with pytest.raises(MarlInputError, match="unknown critic"):
        run_critics(["shared head", "critic from the reference"], base, rm, lora(), tiny_config(), prompts, prompts)
