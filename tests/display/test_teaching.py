"""The pieces notebook 03 uses to teach: KL's role (cached runs) and what one base saves (measured numbers)."""

import json
import re
from pathlib import Path

import pytest

from marl_utils.infra.errors import MarlInputError
from marl_utils.studies.kl_role import CURVES, RESULTS, VARIANTS, load_results, outcome_table, plot_kl_role, run_variants, \
    samples_table
from marl_utils.infra.profiles import PROFILES
from marl_utils.display.trick_savings import MEASURED, plot_savings

ROOT = Path(__file__).resolve().parents[2]


def fake_results(steps=6):
    after = {"reward_mean": 1.0, "kl_mean": 5.0, "response_tokens_mean": 18.0, "distinct_2": 0.4}
    return {name: {"changes": changes, "history": [{k: float(i) for k in CURVES} for i in range(steps)],
                   "before": after, "after": {**after, "kl_mean": 5.0 + i},
                   "samples": [{"prompt": "p", "response": f"r{i}", "score": float(i)}]}
            for i, (name, changes) in enumerate(VARIANTS.items())}


def test_kl_role_figure_has_a_line_per_run_and_the_target():
    fig = plot_kl_role(fake_results(), target_kl=8.0)
    kl_ax = fig.axes[list(CURVES).index("objective/kl")]
    assert len(kl_ax.get_lines()) == len(VARIANTS) + 1
    assert list(kl_ax.get_lines()[-1].get_ydata()) == [8.0, 8.0]
    assert [ax.get_title() for ax in fig.axes] == list(CURVES.values())


def test_kl_role_tables_put_the_runs_side_by_side():
    results = fake_results()
    assert list(samples_table(results).columns) == ["prompt", *VARIANTS]
    table = outcome_table(results)
    assert list(table.index) == list(VARIANTS) and table["kl_mean"].tolist() == [5.0, 6.0, 7.0]


def test_kl_role_refuses_unknown_knobs_before_any_work(tmp_path):
    with pytest.raises(MarlInputError, match="init_kl_coeff"):
        run_variants(PROFILES["tiny"], tmp_path, {"typo": {"init_kl_coeff": 0.0}})
    with pytest.raises(MarlInputError, match="scripts/kl_role.py"):
        load_results(tmp_path / "missing.json")


def test_committed_kl_role_runs_are_the_variants_notebook_03_shows():
    record = json.loads(RESULTS.read_text())
    assert record["profile"] == "tiny" and set(record["runs"]) == set(VARIANTS)
    for name, run in record["runs"].items():
        assert run["changes"] == VARIANTS[name] and len(run["history"]) == PROFILES["tiny"].ppo_steps
        assert run["samples"] and set(run["after"]) >= {"reward_mean", "kl_mean", "response_tokens_mean", "distinct_2"}
    assert (RESULTS.with_suffix(".png")).stat().st_size > 5000


def test_savings_figure_reads_the_performance_page_memory_table():
    """The numbers notebook 03 draws are the measured table of docs/performance.md (a rerun of the bench updates both)."""
    readme = (ROOT / "docs" / "performance.md").read_text()
    rows = {"four separate models, fp32": "separate, fp32", "one base, fp32": "MARL, fp32",
            "one base, 8-bit": "MARL, 8-bit base", "one base, 4-bit": "MARL, 4-bit base"}
    for ours, theirs in rows.items():
        match = re.search(rf"^\| {re.escape(theirs)} \| ([\d.]+) \| [\d.]+ \| (\d+) ", readme, re.M)
        assert match, theirs
        assert MEASURED[ours] == (float(match.group(1)), int(match.group(2))), ours
    fig = plot_savings()
    labels = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert "742\n1.00x" in labels and "192\n0.26x" in labels and "572\n0.51x" in labels
