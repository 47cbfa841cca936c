"""No notebook saves a widget: every notebook runs in a real kernel (nbclient) and its outputs hold no widget view.

A tqdm widget bar (from `tqdm.auto`, which transformers, datasets and the Trainers use) lives in the kernel
that drew it: the saved notebook, opened in a new JupyterLab server, shows "Error displaying widget: model not
found" in its place (issue 23). nbmake runs the notebooks in CI but never looks at what they would save; this
does, without a browser. Each notebook runs whole, in a kernel, on a shrunken `tiny` profile (a first cell
replaces the profile's sizes, so the code path is the notebook's own): the assertions on learning may fail at
these sizes and are not this test's business (errors are allowed), the outputs are.

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

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
FIRST = [p for p in NOTEBOOKS if p.name.startswith("03_")] + [p for p in NOTEBOOKS if not p.name.startswith("03_")]
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"

# The same code path at the size of tests/test_stages.py: seconds per stage instead of minutes.
SHRINK = """
import marl_utils.profiles as _profiles
_profiles.PROFILES["tiny"] = _profiles.PROFILES["tiny"].replace(
    sft_max_steps=4, sft_batch_size=8, sft_max_train_examples=64, sft_eval_examples=8, sft_max_length=48,
    reward_max_steps=3, reward_batch_size=8, reward_train_pairs=24, reward_eval_pairs=8, reward_max_length=48,
    ppo_steps=2, critic_ppo_steps=2, critic_window=1, ppo_batch_size=8, ppo_mini_batch_size=4, ppo_epochs=1,
    ppo_eval_prompts=8, ppo_max_new_tokens=6, ppo_min_response_tokens=3, ppo_save_every=100,
    tiny_model=dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128))
"""


def widget_outputs(nb) -> list[tuple[int, str]]:
    """(cell index, mime types) of every output that would be saved as a widget view."""
    found = []
    for i, cell in enumerate(nb.cells):
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if WIDGET_MIME in data or any("widget" in mime for mime in data):
                found.append((i, ", ".join(sorted(data))))
    return found


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    return tmp_path_factory.mktemp("widgets-out")


def run_in_kernel(path: Path, out: Path):
    nb = nbformat.read(path, as_version=4)
    nb.cells.insert(0, nbformat.v4.new_code_cell(SHRINK))
    env = dict(os.environ, MARL_PROFILE="tiny", MARL_OUTPUT_DIR=str(out), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    client = nbclient.NotebookClient(nb, timeout=600, allow_errors=True, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    client.execute(env=env)
    return nb


@pytest.mark.parametrize("path", FIRST, ids=lambda p: p.name)
def test_saved_notebook_holds_no_widget(path, run_folder):
    nb = run_in_kernel(path, run_folder)
    ran = [c for c in nb.cells if c.cell_type == "code" and c.get("execution_count")]
    assert len(ran) == sum(c.cell_type == "code" for c in nb.cells), f"{path.name}: not every cell ran"
    found = widget_outputs(nb)
    assert not found, (f"{path.name}: cells {found} would be saved as widgets, which a reopened notebook cannot draw "
                       "('Error displaying widget'); draw progress with marl_utils.progress.progress_bar or "
                       "keep loading quiet with no_library_bars")
    text = json.dumps([c.get("outputs", []) for c in nb.cells])
    assert "Loading weights" not in text, f"{path.name}: a model-loading bar is shown"
