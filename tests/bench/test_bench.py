"""`marl bench` (issues 6, 13): storage counted once, the compute floor and the ratios to it, the minibatch profile,
the tiny bench's json, chart and orderings. No test asserts that a time is below a bar: only that the figures
are produced, consistent with each other, and measure the same work."""

import json
import math
import os

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from marl_utils.bench.command import format_table, peak_rss_bytes, reset_peak_rss, rss_bytes, run_bench
from marl_utils.bench.floor import Floor, StepShape, gae, response_logprobs
from marl_utils.bench.layouts import BASE_SIZES, left_padded, load_layout, policy_lora_config
from marl_utils.bench.memory import resident_bytes
from marl_utils.bench.ratio import NOT_YET, PHASES, compare_to_floor, critic_adapter_supported, summarise_runs
from marl_utils.infra.errors import MarlInputError
from marl_utils.infra.profiles import PROFILES

TEST_LAYOUTS = ["marl_fp32", "critic_fp32", "marl_8bit", "marl_4bit", "separate_fp32"]
SHAPE = StepShape(batch=4, new_tokens=4, ppo_epochs=2, minibatches=2)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models run fastest on one thread, and a second one only fights other jobs on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class TiedLM(nn.Module):
    """Embedding and output layer sharing one weight, as the tiny base ties them."""

    def __init__(self, vocab=100, hidden=16):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.out = nn.Linear(hidden, vocab, bias=False)
        self.out.weight = self.embed.weight


def test_resident_bytes_counts_shared_storage_once():
    model = TiedLM()
    table = 100 * 16 * 4
    assert resident_bytes(model) == table  # not 2 * table: the output layer IS the embedding
    model.register_buffer("first_rows", model.embed.weight.detach()[:10])  # a view into the same memory
    assert resident_bytes(model) == table
    other = TiedLM()
    assert resident_bytes(model, other) == 2 * table  # a copy is a copy
    assert resident_bytes(model, model) == table


def test_gae_with_lambda_one_is_return_minus_value():
    rewards = torch.tensor([[1.0, 0.0, 2.0]])
    values = torch.tensor([[0.5, 0.25, 1.0]])
    advantages, returns = gae(rewards, values, gamma=1.0, lam=1.0)
    assert torch.allclose(advantages, torch.tensor([[3.0, 2.0, 2.0]]) - values)
    assert torch.allclose(returns, torch.tensor([[3.0, 2.0, 2.0]]))


@pytest.mark.skipif(rss_bytes() is None, reason="needs /proc/self/status")
def test_peak_rss_can_be_restarted_after_loading():
    block = bytearray(64_000_000)
    block[::4096] = b"x" * len(block[::4096])  # touch every page
    high = peak_rss_bytes()
    del block
    if not reset_peak_rss():
        pytest.skip("/proc/self/clear_refs is not writable here")
    assert peak_rss_bytes() < high - 32_000_000


BAD_ARGUMENTS = [(dict(base_size="huge"), "base_size"), (dict(steps=0), "steps"),
                 (dict(layouts=["marl_fp16"]), "unknown layouts"), (dict(jobs=0), "jobs"),
                 (dict(precision="fp16"), "precision"), (dict(device="tpu"), "device"),
                 (dict(time_budget=0), "time_budget"), (dict(compare=("marl", "trl")), "not timed layouts")]
if not torch.cuda.is_available():
    BAD_ARGUMENTS.append((dict(device="cuda"), "no CUDA device"))


@pytest.mark.parametrize("kwargs, words", BAD_ARGUMENTS)
def test_bad_arguments_fail_before_any_work(tmp_path, kwargs, words):
    with pytest.raises(MarlInputError, match=words):
        run_bench(PROFILES["tiny"], output_dir=tmp_path / "out", **{"base_size": "tiny", **kwargs})
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    # jobs=4: memory figures are per process either way; timings are not asserted
    summary = run_bench(PROFILES["tiny"], output_dir=out, base_size="tiny", steps=2, layouts=TEST_LAYOUTS,
                        shape=SHAPE, memory_steps=0, jobs=4, threads=1, device="cpu", profile_step=True)
    return out, summary


def test_bench_json_structure(tiny_bench):
    out, summary = tiny_bench
    assert json.loads((out / "bench.json").read_text()) == json.loads(json.dumps(summary))
    assert summary["base_size"] == "tiny" and summary["steps"] == 2 and summary["memory_skipped"] is None
    assert set(summary["layouts"]) == set(TEST_LAYOUTS)
    for name, row in summary["layouts"].items():
        for key in ("param_bytes", "peak_rss_bytes", "baseline_rss_bytes"):
            assert isinstance(row[key], int) and row[key] > 0, (name, key)
        assert row["peak_rss_bytes"] >= row["baseline_rss_bytes"]
        assert row["model_rss_bytes"] == row["peak_rss_bytes"] - row["baseline_rss_bytes"]
        assert set(row["step_seconds"]) >= {"generate", "score", "rollout", "optimise"}
        assert all(math.isfinite(v) and v > 0 for v in row["step_seconds"].values())
    assert summary["ratios"]["marl_fp32/separate_fp32.param_bytes"] < 1
    assert (out / "plots" / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = format_table(summary)
    assert all(name in table for name in TEST_LAYOUTS) and "MARL param bytes / separate" in table
    assert "ours / compute floor" in table and "one training minibatch" in table


def test_marl_holds_one_base_and_separate_four(tiny_bench):
    out, summary = tiny_bench
    layouts, base_bytes = summary["layouts"], 4 * summary["base_params"]
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(out / "bench" / "base-tiny")
    assert summary["base_params"] == sum(p.numel() for p in base.parameters())  # tied table once
    assert base.config.hidden_size == BASE_SIZES["tiny"]["hidden_size"]
    marl = layouts["marl_fp32"]
    # one base (+ the rotary buffer, a few hundred bytes) plus adapters and heads: the tied table counted once
    assert 0 <= marl["param_bytes"] - marl["adapter_and_head_bytes"] - base_bytes < 4096
    critic = layouts["critic_fp32"]  # the same base; the critic adapter is one more policy-shaped LoRA
    assert critic["param_bytes"] - marl["param_bytes"] == critic["adapter_and_head_bytes"] - marl["adapter_and_head_bytes"]
    assert 0 < critic["adapter_and_head_bytes"] - marl["adapter_and_head_bytes"] < marl["adapter_and_head_bytes"]
    separate = layouts["separate_fp32"]
    assert set(separate["models"]) == {"policy", "ref", "reward", "value"}
    assert all(size >= base_bytes for size in separate["models"].values())
    assert separate["param_bytes"] >= 4 * base_bytes > 3 * marl["param_bytes"]


def test_quantized_bytes_order_and_scales_are_counted(tiny_bench):
    _, summary = tiny_bench
    layouts = summary["layouts"]
    fp32, int8, nf4 = (layouts[f"marl_{p}"]["param_bytes"] for p in ("fp32", "8bit", "4bit"))
    assert nf4 < int8 < fp32
    sizes = BASE_SIZES["tiny"]
    hidden, inner, layers = sizes["hidden_size"], sizes["intermediate_size"], sizes["num_hidden_layers"]
    linear = layers * (4 * hidden * hidden + 3 * hidden * inner)  # the weights bitsandbytes quantizes
    # 4-bit: two weights per byte plus one float32 absmax per block of 64; 8-bit: a byte each plus row scales
    assert layouts["marl_4bit"]["quantized_param_bytes"] >= linear // 2 + linear // 64 * 4
    rows = layers * (5 * hidden + 2 * inner)  # output rows: q, k, v, o, down have `hidden`, gate and up `inner`
    assert layouts["marl_8bit"]["quantized_param_bytes"] >= linear + rows * 4
    for name in ("marl_8bit", "marl_4bit"):
        assert layouts[name]["unquantized_base_bytes"] > 0  # embeddings and norms, left unquantized, are counted


# ---------------------------------------------------------------------------- the compute floor and the ratios
def test_floor_computes_what_the_marl_model_computes(tiny_bench):
    """Same base, same reward adapter: the floor's reward scores and reference logprobs are the MARL model's."""
    out, summary = tiny_bench
    inputs = json.loads((out / "bench" / "inputs-tiny.json").read_text())
    floor = Floor(inputs["base"], inputs["reward_adapter"], policy_lora_config(inputs["lora"]), "cpu",
                  pad_id=inputs["pad_id"])
    marl = load_layout("marl", "fp32", inputs).model
    ids, mask = left_padded(inputs["prompts"], inputs["pad_id"])
    torch.manual_seed(0)
    with torch.no_grad():
        ids = floor.model.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_k=0, max_new_tokens=4,
                                   min_new_tokens=4, pad_token_id=inputs["pad_id"])
        mask = torch.cat([mask, torch.ones_like(ids[:, mask.shape[1]:])], 1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        torch.testing.assert_close(floor.reward_scores(ids, mask, positions),
                                   marl.compute_reward_score(input_ids=ids, attention_mask=mask))
        with floor.model.disable_adapter():
            floor_ref = floor.model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        torch.testing.assert_close(response_logprobs(floor_ref, ids, 4),
                                   response_logprobs(marl.reference_logits(ids, mask), ids, 4))
    trainable = sum(p.numel() for p in floor.policy_params) + sum(p.numel() for p in floor.value_head.parameters())
    assert trainable == sum(p.numel() for p in marl.trainable_parameters())  # the same LoRA and head to train


def test_floor_and_layouts_do_the_same_work_and_ratios_are_ours_over_floor(tiny_bench):
    _, summary = tiny_bench
    comparison = summary["floor_comparison"]
    runs, medians, ratios = comparison["steps_detail"], comparison["median_seconds"], comparison["ratios"]
    assert comparison["steps"] == 2 and comparison["shape"]["batch"] == SHAPE.batch
    assert {"floor", "marl", "separate"} <= set(runs)
    for name, steps in runs.items():
        assert len(steps) == 2
        for step in steps:
            fused_reward = name not in ("floor", "separate") and step["score"] is None  # scored in the rollout
            phases = [step[p] for p in PHASES if not (p == "score" and fused_reward)]
            assert all(math.isfinite(v) and v > 0 for v in phases + [step["total"]]), (name, step)
            if name in ("floor", "separate"):  # the bench's own steps: the phases tile the step exactly
                assert step["response_tokens"] == SHAPE.new_tokens  # forced: the same work in every step
                assert sum(phases) == pytest.approx(step["total"], rel=1e-9)
            else:  # the trainer's phase timers sit inside the clock around its train() step
                assert 0 < step["response_tokens"] <= SHAPE.new_tokens  # plain sampling: EOS may end one early
                assert sum(phases) <= step["total"] * (1 + 1e-9)
                assert step["ppo_epochs"] == SHAPE.ppo_epochs
    for name, row in ratios.items():
        for key in (*PHASES, "total"):
            if row["score_in_rollout"] and key in ("score", "rollout"):
                continue
            assert row[key] == pytest.approx(medians[name][key] / medians["floor"][key])
        if row["score_in_rollout"]:  # one fused pass against the floor's reward pass + rollout forwards
            assert row["score"] is None
            assert row["rollout"] == pytest.approx(medians[name]["rollout"]
                                                   / (medians["floor"]["score"] + medians["floor"]["rollout"]))
        pairs = [ours["total"] / base["total"] for ours, base in zip(runs[name], runs["floor"])]
        assert row["total_pairs"] == pytest.approx(pairs)
        assert row["total_pair_min"] <= row["total"] <= row["total_pair_max"]  # medians are monotone
    if critic_adapter_supported():
        assert "critic_adapter" in runs or "critic_adapter" in comparison["unavailable"]
    else:
        assert comparison["unavailable"]["critic_adapter"].startswith(NOT_YET)
        assert NOT_YET in format_table(summary)


def test_summarise_runs_medians_and_pairs():
    def step(total, optimise):
        return {"generate": 0.1, "score": 0.1, "rollout": 0.1, "optimise": optimise, "total": total}

    runs = {"floor": [step(1.0, 0.5), step(2.0, 1.0), step(3.0, 2.0)],
            "marl": [step(2.0, 1.0), step(2.0, 1.0), step(9.0, 8.0)]}
    result = summarise_runs(runs)
    assert result["median_seconds"]["floor"]["total"] == 2.0 and result["median_seconds"]["marl"]["total"] == 2.0
    assert result["ratios"]["marl"]["total"] == 1.0  # ratio of medians, not the median of ratios
    assert result["ratios"]["marl"]["total_pairs"] == [2.0, 1.0, 3.0]
    assert (result["ratios"]["marl"]["total_pair_min"], result["ratios"]["marl"]["total_pair_max"]) == (1.0, 3.0)
    assert result["ratios"]["marl"]["optimise"] == 1.0
    assert result["median_seconds"]["floor"]["other"] == pytest.approx(2.0 - 0.3 - 1.0)  # median of per-step rests
    fused = {"floor": runs["floor"], "marl": [{**s, "score": None} for s in runs["marl"]]}
    ratio = summarise_runs(fused)["ratios"]["marl"]
    assert ratio["score_in_rollout"] and ratio["score"] is None
    assert ratio["rollout"] == pytest.approx(0.1 / (0.1 + 0.1))


def test_critic_adapter_is_detected_from_the_signature():
    class Today:
        @classmethod
        def from_pretrained(cls, name, *, peft_config=None, reward_adapter=None, **kwargs):
            return None

    class WithCritic:
        @classmethod
        def from_pretrained(cls, name, *, peft_config=None, critic="head", **kwargs):
            return None

    assert not critic_adapter_supported(Today) and critic_adapter_supported(WithCritic)


def test_time_budget_stops_after_two_timed_repeats(tiny_bench):
    out, _ = tiny_bench
    inputs = json.loads((out / "bench" / "inputs-tiny.json").read_text())
    shape = StepShape(batch=4, new_tokens=2, ppo_epochs=1, minibatches=1)
    result = compare_to_floor(inputs, shape, steps=5, layouts=(), time_budget=1e-3, log=lambda message: None)
    assert result["stopped_by_budget"] and result["steps"] == 2 and "budget" in result["notes"]
    assert set(result["steps_detail"]) == {"floor"}


def test_profile_step_finds_each_piece(tiny_bench):
    _, summary = tiny_bench
    profiled = summary["profile_step"]
    for name in ("floor", "marl"):
        run = profiled[name]
        assert run["seconds_per_minibatch"] > 0 and run["minibatches"] == profiled["window_minibatches"] >= 1
        ms = run["ms_per_minibatch"]
        assert set(ms) == set(profiled["buckets"])
        # the shapes tell the pieces apart: LoRA matmuls (rank r), the LM head (vocabulary), the optimizer
        for bucket in ("base linear layers", "LoRA A/B matmuls", "LM head", "Adam step"):
            assert ms[bucket] > 0 and run["ops_per_minibatch"][bucket] >= 1, (name, bucket)
    assert profiled["ratio"] == pytest.approx(profiled["marl"]["seconds_per_minibatch"]
                                              / profiled["floor"]["seconds_per_minibatch"])
