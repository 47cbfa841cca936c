"""How one pytest run executes the tests and the notebooks together, on one core or several (pytest-xdist).

The README's test command runs `tests` and `notebooks` (nbmake) with `-n 2 --dist loadgroup`: two worker
processes, each taking whole work units. The tests are small and run on one thread each, so a second worker
roughly halves the wall time. The notebooks need care, because they share one output folder:

- 01 trains stage 1 (SFT) and 02 stage 2 (the reward adapter) into `$MARL_OUTPUT_DIR/<profile>/`; 03-08 reuse
  them. So 01 and 02 form ONE work unit (the `notebook-stages` group), scheduled first, and they hold a lock
  file from the start of 01 to the end of 02. Every later notebook waits for that lock before it starts, so it
  never trains the stages a second time beside 02, or reads a half-finished stage.
- Every test file is its own work unit (module-scoped fixtures, e.g. the widget test's one kernel, run once).
- The later notebooks come last, longest first, so that neither worker sits idle at the end.

Without xdist (a plain `pytest ...`) the same order holds and the lock is never contended.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent
STAGE_NOTEBOOKS = ("01_", "02_")
# Later notebooks, longest first (tiny profile, measured on a 2-core CPU); one not listed runs after these.
LATER_NOTEBOOKS = ("06_", "04_", "03_", "07_", "05_", "08_")

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; run the notebooks without -n there
    fcntl = None


def _notebook(item) -> str | None:
    """The notebook's file name for an nbmake item, else None."""
    path = Path(str(getattr(item, "path", "")))
    return path.name if path.suffix == ".ipynb" else None


def _lock_path() -> Path:
    out = Path(os.environ.get("MARL_OUTPUT_DIR") or ROOT / "runs")
    out.mkdir(parents=True, exist_ok=True)
    return out / ".notebook-stages.lock"


def pytest_collection_modifyitems(config, items):
    def rank(item):
        name = _notebook(item)
        if name is None:
            return (1, 0)
        if name.startswith(STAGE_NOTEBOOKS):
            return (0, 0)
        later = [i for i, prefix in enumerate(LATER_NOTEBOOKS) if name.startswith(prefix)]
        return (2, later[0] if later else len(LATER_NOTEBOOKS))

    items.sort(key=rank)  # stable: tests keep their order
    for item in items:
        name = _notebook(item)
        if name is not None and name.startswith(STAGE_NOTEBOOKS):
            group = "notebook-stages"
        else:
            group = str(getattr(item, "path", item.nodeid))   # one unit per file
        item.add_marker(pytest.mark.xdist_group(group))


_held = {"file": None, "left": 0}


def pytest_collection_finish(session):
    _held["left"] = sum(1 for item in session.items if (_notebook(item) or "").startswith(STAGE_NOTEBOOKS))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    name = _notebook(item)
    if name is None or fcntl is None:
        return
    if name.startswith(STAGE_NOTEBOOKS):
        if _held["file"] is None:
            _held["file"] = open(_lock_path(), "w")
            fcntl.flock(_held["file"], fcntl.LOCK_EX)
    else:
        with open(_lock_path(), "w") as f:   # wait until the stage notebooks (if running) are done
            fcntl.flock(f, fcntl.LOCK_SH)


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem):
    name = _notebook(item)
    if name is None or not name.startswith(STAGE_NOTEBOOKS) or _held["file"] is None:
        return
    _held["left"] -= 1
    # This worker may have been sent only some of them: release when the next item is not a stage notebook.
    if _held["left"] <= 0 or nextitem is None or not (_notebook(nextitem) or "").startswith(STAGE_NOTEBOOKS):
        with contextlib.suppress(OSError):
            fcntl.flock(_held["file"], fcntl.LOCK_UN)
        _held["file"].close()
        _held["file"] = None
