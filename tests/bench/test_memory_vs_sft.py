"""Memory of PPO against SFT (marl_utils.bench.sft_memory): the SFT process on the tiny bench base, the table."""

import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from marl_utils.bench.layouts import BENCH_LORA, STEP_SHAPES, prepare_bench_models
from marl_utils.bench.sft_memory import _run_sft_process, format_sft_table, memory_vs_sft
from marl_utils.infra.errors import MarlInputError


@pytest.mark.parametrize("kwargs, words", [({"base_size": "huge"}, "base_size"), ({"sft_steps": 0}, "sft_steps"),
                                           ({"ppo_steps": 0}, "ppo_steps")])
def test_bad_arguments_fail_before_any_work(tmp_path, kwargs, words):
    with pytest.raises(MarlInputError, match=words):
        memory_vs_sft(output_dir=tmp_path / "out", **{"base_size": "tiny", **kwargs})
    assert not (tmp_path / "out" / "bench").exists()


def test_sft_process_trains_every_weight_and_holds_adam_state(tmp_path):
    inputs = {**prepare_bench_models(tmp_path / "bench", "tiny", BENCH_LORA, batch=8),
              "shape": STEP_SHAPES["tiny"].as_dict()}
    inputs_file = tmp_path / "inputs.json"
    inputs_file.write_text(json.dumps(inputs))
    row = _run_sft_process(inputs_file, steps=1, batch_size=4, max_length=32, threads=1)
    assert row["trainable_params"] == inputs["base_params"]  # full fine-tuning, as stage 1
    # AdamW: two float32 moments per weight (and a scalar step count per tensor)
    assert row["optimizer_state_bytes"] == pytest.approx(2 * row["param_bytes"], rel=1e-3)
    assert row["peak_rss_bytes"] >= row["after_load_rss_bytes"] > row["baseline_rss_bytes"] > 0
    assert row["sft_shape"] == {"batch_size": 4, "max_length": 32, "steps": 1}


def test_table_rows_and_ratios_to_sft():
    def row(trained, params_mb, peak_mb, model_mb):
        return {"trainable_params": trained, "param_bytes": params_mb * 1e6, "peak_rss_bytes": peak_mb * 1e6,
                "model_rss_bytes": model_mb * 1e6}

    summary = {"base_size": "mid", "base_params": 46e6, "lora": BENCH_LORA,
               "sft_shape": {"batch_size": 16, "max_length": 128, "steps": 3},
               "ppo_shape": STEP_SHAPES["mid"].as_dict(),
               "layouts": {"sft_fp32": row(46_000_000, 184, 1400, 1000), "marl_fp32": row(1_000_000, 190, 900, 500),
                           "separate_fp32": row(1_000_000, 740, 1600, 1200)}}
    lines = format_sft_table(summary).splitlines()
    assert [line.split()[0] for line in lines[2:5]] == ["sft_fp32", "marl_fp32", "separate_fp32"]
    assert [line.split()[-1] for line in lines[2:5]] == ["1.00", "0.50", "1.20"]
