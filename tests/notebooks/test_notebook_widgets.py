"""No notebook saves a widget: every notebook runs in a real kernel (nbclient) and its outputs hold no widget view.

A tqdm widget bar (from `tqdm.auto`, which transformers, datasets and the Trainers use) lives in the kernel
that drew it: the saved notebook, opened in a new JupyterLab server, shows "Error displaying widget: model not
found" in its place (issue 23). nbmake runs the notebooks in CI but never looks at what they would save; this
does, without a browser. Every notebook runs whole, one after the other in ONE kernel (its start and imports
cost more than the cells), on a shrunken `tiny` profile (a first cell replaces the profile's sizes, so the code
path is the notebooks' own): the assertions on learning may fail at these sizes and are not this test's
business (an AssertionError is allowed; any other error is a broken cell and fails), the outputs are.

The stages run ONCE, from an empty output folder, inside notebook 03's first cell (`ensure_earlier_stages`
trains them, with its progress bars); the other notebooks then reuse them, and 01 and 02 also take the
"already finished" branch. Every notebook file in notebooks/ is checked, a new one included.
"""

import json
import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
FIRST = [p for p in NOTEBOOKS if p.name.startswith("03_")] + [p for p in NOTEBOOKS if not p.name.startswith("03_")]
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"

from small_profiles import SHRUNK_TINY_CELL as SHRINK   # the same code path, seconds per stage


def widget_outputs(cells) -> list[tuple[int, str]]:
    """(code cell number, mime types) of every output that would be saved as a widget view."""
    found = []
    for i, cell in enumerate(cells):
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if WIDGET_MIME in data or any("widget" in mime for mime in data):
                found.append((i, ", ".join(sorted(data))))
    return found


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """Every notebook, 03 first, run whole in ONE kernel (its start and imports are most of the time): name -> cells."""
    out = tmp_path_factory.mktemp("widgets-out")
    combined = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(SHRINK)])
    for path in FIRST:
        for cell in nbformat.read(path, as_version=4).cells:
            if cell.cell_type == "code":
                cell.metadata["from_notebook"] = path.name
                combined.cells.append(cell)
    env = dict(os.environ, MARL_PROFILE="tiny", MARL_OUTPUT_DIR=str(out), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    client = nbclient.NotebookClient(combined, timeout=600, allow_errors=True, kernel_name="python3",
                                     resources={"metadata": {"path": str(ROOT / "notebooks")}})
    client.execute(env=env)
    by_notebook = {}
    for cell in combined.cells[1:]:
        by_notebook.setdefault(cell.metadata["from_notebook"], []).append(cell)
    return by_notebook


@pytest.mark.parametrize("path", FIRST, ids=lambda p: p.name)
def test_saved_notebook_holds_no_widget(path, executed):
    cells = executed[path.name]
    assert all(c.get("execution_count") for c in cells), f"{path.name}: not every cell ran"
    found = widget_outputs(cells)
    assert not found, (f"{path.name}: code cells {found} would be saved as widgets, which a reopened notebook "
                       "cannot draw ('Error displaying widget'); draw progress with marl_utils.infra.progress.progress_bar "
                       "or keep loading quiet with no_library_bars")
    # at these sizes a learning bar may fail (AssertionError); any other error is a broken cell
    errors = [(i, o["ename"], o["evalue"][:200]) for i, c in enumerate(cells) for o in c.get("outputs", [])
              if o["output_type"] == "error" and o["ename"] != "AssertionError"]
    assert not errors, f"{path.name}: code cells failed: {errors}"
    text = json.dumps([c.get("outputs", []) for c in cells])
    assert "Loading weights" not in text, f"{path.name}: a model-loading bar is shown"


def test_progress_bars_are_text_in_a_kernel(monkeypatch):
    """What the notebooks' training loops draw (PPO, GRPO, the critics, a Trainer's LossProgressBar): text."""
    import io

    import marl_utils.infra.progress as progress
    from tqdm.std import tqdm

    monkeypatch.setattr(progress, "in_jupyter_kernel", lambda: True)
    stdout = io.StringIO()
    monkeypatch.setattr(progress.sys, "stdout", stdout)
    bar = progress.progress_bar(total=3, desc="PPO")
    bar.update(3)
    bar.close()
    assert type(bar) is tqdm and "PPO: 100%" in stdout.getvalue()   # not tqdm.notebook's widget subclass
    from transformers.utils import logging as hf_logging

    assert type(hf_logging.tqdm(total=1, disable=False)) is tqdm   # transformers' bars go through the hook


def test_no_module_draws_with_tqdm_auto():
    """tqdm.auto picks a widget in Jupyter: marl_utils draws bars through marl_utils.infra.progress only."""
    users = [p.name for p in (ROOT / "marl_utils").glob("*.py")
             if "tqdm.auto" in p.read_text() and p.name != "progress.py"]
    assert not users, f"{users} import tqdm.auto; use marl_utils.infra.progress.progress_bar"
