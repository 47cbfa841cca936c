"""`marl bench` (issue 6): storage counted once, the tiny bench's json, chart and orderings; no test asserts a time."""

import json
import math
import os
from pathlib import Path

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from marl_utils.bench import format_table, peak_rss_bytes, reset_peak_rss, rss_bytes, run_bench
from marl_utils.bench_layouts import BASE_SIZES, gae, resident_bytes
from marl_utils.errors import MarlInputError
from marl_utils.profiles import PROFILES

TEST_LAYOUTS = ["marl_fp32", "marl_8bit", "marl_4bit", "separate_fp32"]


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


@pytest.mark.parametrize("kwargs, words", [(dict(base_size="huge"), "base_size"), (dict(steps=0), "steps"),
                                           (dict(layouts=["marl_fp16"]), "unknown layouts"), (dict(jobs=0), "jobs")])
def test_bad_arguments_fail_before_any_work(tmp_path, kwargs, words):
    with pytest.raises(MarlInputError, match=words):
        run_bench(PROFILES["tiny"], output_dir=tmp_path / "out", **{"base_size": "tiny", **kwargs})
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    # jobs=2: memory figures are per process either way; timings are not asserted
    summary = run_bench(PROFILES["tiny"], output_dir=out, base_size="tiny", steps=1, layouts=TEST_LAYOUTS,
                        batch=4, new_tokens=8, cross_check=False, jobs=2, threads=1)
    return out, summary


def test_bench_json_structure(tiny_bench):
    out, summary = tiny_bench
    assert json.loads((out / "bench.json").read_text()) == json.loads(json.dumps(summary))
    assert summary["base_size"] == "tiny" and summary["steps"] == 1
    assert set(summary["layouts"]) == set(TEST_LAYOUTS)
    for name, row in summary["layouts"].items():
        for key in ("param_bytes", "peak_rss_bytes", "baseline_rss_bytes"):
            assert isinstance(row[key], int) and row[key] > 0, (name, key)
        assert row["peak_rss_bytes"] >= row["baseline_rss_bytes"]
        assert row["model_rss_bytes"] == row["peak_rss_bytes"] - row["baseline_rss_bytes"]
        assert set(row["step_seconds"]) >= {"generate", "score", "optimise"}
        assert all(math.isfinite(v) and v > 0 for v in row["step_seconds"].values())
    assert summary["ratios"]["marl_fp32/separate_fp32.param_bytes"] < 1
    assert (out / "plots" / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = format_table(summary)
    assert all(name in table for name in TEST_LAYOUTS) and "MARL param bytes / separate" in table


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
