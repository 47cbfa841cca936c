"""Parity over seeds (marl_utils.studies.parity, scripts/parity.py): the statistics, the verdicts, the saved runs, one run."""

import json
import math
import os
import random
import zlib

import pytest
import torch
from peft import LoraConfig
from transformers import AutoTokenizer
from script_loader import load_script
from stand_ins import LORA_TARGETS, make_reward_adapter, make_tiny_llama

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from marl_utils.infra.errors import MarlInputError
from marl_utils.studies.parity import (BASELINE, METRICS, GoldRecorder, check_layouts, compare, format_table, run_layout,
                               student_t_quantile, verdict, welch_interval)
from marl_utils.ppo.config import PPOConfig

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


def script():
    return load_script("parity")


@pytest.mark.parametrize("p, df, expected", [(0.975, 4, 2.776), (0.975, 10, 2.228), (0.975, 1, 12.706),
                                             (0.95, 7, 1.895), (0.975, 1e6, 1.960)])
def test_student_t_quantiles_match_the_printed_tables(p, df, expected):
    assert student_t_quantile(p, df) == pytest.approx(expected, abs=1e-3)


def test_welch_interval_by_hand_and_its_coverage():
    a, b = [1.0, 2.0, 3.0, 4.0, 5.0], [0.0, 2.0, 4.0]
    diff, lo, hi = welch_interval(a, b)
    va, vb = 2.5 / 5, 4.0 / 3  # sample variances over n
    df = (va + vb) ** 2 / (va ** 2 / 4 + vb ** 2 / 2)
    half = student_t_quantile(0.975, df) * math.sqrt(va + vb)
    assert (diff, lo, hi) == pytest.approx((1.0, 1.0 - half, 1.0 + half))
    # two groups of 5 from the same normal: the 95% interval covers the true difference (0) ~95% of the time
    rng = random.Random(0)
    covered = 0
    for _ in range(300):
        _, lo, hi = welch_interval([rng.gauss(0, 1) for _ in range(5)], [rng.gauss(0, 2) for _ in range(5)])
        covered += lo <= 0 <= hi
    assert 0.91 <= covered / 300 <= 0.99
    with pytest.raises(MarlInputError, match="at least 2 values per group"):
        welch_interval([1.0], [1.0, 2.0])


def rows_of(layout, values: dict, seeds=5):
    rng = random.Random(zlib.crc32(layout.encode()))  # str hash() changes between processes
    return [{"layout": layout, "seed": s, **{m: values.get(m, 0.0) + rng.gauss(0, 0.1) for m in METRICS}}
            for s in range(seeds)]


def test_compare_finds_a_shifted_metric_and_nothing_else():
    base = rows_of(BASELINE, {"gold gain": 1.0})
    same = [{**row, "layout": "one base fp32", "seed": 4 - row["seed"]} for row in base]  # the same numbers
    shifted_kl = [{**row, "layout": "one base 8-bit", "final KL": row["final KL"] + 3.0} for row in base]
    rows = base + same + shifted_kl
    table = {row["layout"]: row for row in compare(rows)}
    assert table[BASELINE]["verdict"] == "baseline"
    assert table["one base fp32"]["verdict"] == "no difference detected at this n (5 seeds)"
    shifted = table["one base 8-bit"]
    assert shifted["verdict"].startswith("differs: final KL higher by 3.")
    assert "gold gain" not in shifted["verdict"]
    diff, lo, hi = shifted["final KL diff"]
    assert lo < 3.0 < hi and diff == pytest.approx(3.0)
    diff, lo, hi = table["one base fp32"]["gold gain diff"]
    assert diff == pytest.approx(0.0, abs=1e-12) and lo < 0 < hi
    text = format_table(compare(rows))
    assert text.count("\n") == 4 and "| one base 8-bit | 5 |" in text


def test_compare_needs_the_baseline_and_two_seeds():
    with pytest.raises(MarlInputError, match="no run of the baseline layout"):
        compare(rows_of("one base fp32", {}))
    one_seed = compare(rows_of(BASELINE, {}, seeds=1) + rows_of("one base fp32", {}, seeds=1))
    assert one_seed[1]["verdict"] == "too few seeds to compare (need 2 per layout)"
    assert verdict({"seeds": 1}) == "too few seeds to compare (need 2 per layout)"


def test_unknown_layouts_are_refused_before_anything_loads():
    assert check_layouts(["one base fp32", BASELINE]) == ["one base fp32", BASELINE]
    with pytest.raises(MarlInputError, match=r"unknown layout\(s\) \['one base 3-bit'\]; choose from"):
        check_layouts(["one base fp32", "one base 3-bit"])


def test_saved_runs_survive_a_cut_line_and_make_the_report(tmp_path):
    parity = script()
    runs = tmp_path / "parity_tiny_runs.jsonl"
    rows = rows_of(BASELINE, {"proxy gain": 2.0}, seeds=3) + rows_of("one base 8-bit", {"proxy gain": 2.0}, seeds=3)
    for row in rows:
        row.update({"steps": 4, "batch": 8, "proxy before": 0.0, "proxy after": 2.0, "gold before": 0.0, "gold after": 1.0,
                    "response tokens": 20.0, "seconds": 1.0,
                    "curves": {k: [0.1 * i for i in range(4)] for k in ("env/score_mean", "env/gold_mean", "objective/kl")}})
        parity.append_run(runs, row)
    parity.append_run(runs, {**rows[0], "proxy gain": 99.0})  # the same run again, from an overlapping sweep
    with runs.open("a") as f:
        f.write('{"layout": "one base fp32", "se')  # a sweep killed mid-write
    assert parity.read_runs(runs) == json.loads("[" + ",".join(json.dumps(r) for r in rows) + "]")
    text = parity.write_report(parity.read_runs(runs), tmp_path, "tiny", "header line")
    assert text.startswith("header line") and "| one base 8-bit | 3 |" in text
    assert (tmp_path / "parity_tiny.png").stat().st_size > 10_000
    csv_lines = (tmp_path / "parity_tiny_runs.csv").read_text().splitlines()
    assert len(csv_lines) == 7 and csv_lines[0].startswith("layout,seed,steps,batch,proxy before")


def test_the_script_refuses_bad_arguments_before_training(tmp_path, capsys):
    parity = script()
    assert parity.main(["--profile", "tiny", "--layouts", "one base 2-bit", "--results-dir", str(tmp_path)]) == 2
    assert "unknown layout(s) ['one base 2-bit']" in capsys.readouterr().err
    assert parity.main(["--profile", "tiny", "--seeds", "3", "3", "--results-dir", str(tmp_path)]) == 2
    assert "2 different seeds" in capsys.readouterr().err
    assert parity.main(["--profile", "tiny", "--report-only", "--results-dir", str(tmp_path)]) == 2
    assert "holds no runs" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    base = make_tiny_llama(root / "base", hidden=32)
    return base, make_reward_adapter(base, root / "rm")


def test_one_run_records_gold_of_the_very_rollouts_the_proxy_scored(paths):
    base, rm = paths
    seen = []

    def gold_fn(texts):  # a stand-in gold: the length of the text, so every call is easy to check
        seen.append(list(texts))
        return [float(len(t)) for t in texts]

    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA_TARGETS["llama"], task_type="CAUSAL_LM")
    config = PPOConfig(seed=0, steps=2, batch_size=4, mini_batch_size=2, ppo_epochs=1, max_new_tokens=4,
                       min_response_tokens=1)
    prompts = [torch.tensor([5, 6, 7]), torch.tensor([8, 9]), torch.tensor([10, 11, 12]), torch.tensor([13, 14])]
    row = run_layout("one base fp32", base, rm, lora, config, prompts, prompts[:3], gold_fn)
    # before, 2 training steps, after: 4 calls; the training ones are 4 rollouts each, the evaluations 3
    assert [len(call) for call in seen] == [3, 4, 4, 3]
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    starts = [tokenizer.decode(p, skip_special_tokens=True) for p in prompts]
    for text in seen[1] + seen[2]:  # gold scores the prompt + response, the text the proxy scores
        assert any(text.startswith(start) for start in starts), text
    assert row["curves"]["env/gold_mean"] == [sum(map(len, call)) / 4 for call in seen[1:3]]
    assert row["gold before"] == pytest.approx(sum(map(len, seen[0])) / 3)
    assert row["gold gain"] == pytest.approx(row["gold after"] - row["gold before"])
    assert len(row["curves"]["env/score_mean"]) == 2 and set(METRICS) <= set(row)


def test_the_recorder_leaves_steps_without_a_rollout_alone():
    class Fake:
        def generate(self, queries, **kwargs):
            return queries

    trainer = Fake()
    recorder = GoldRecorder(trainer, lambda texts: [1.0] * len(texts))
    entry = {}
    recorder(trainer, entry)
    assert entry == {}
