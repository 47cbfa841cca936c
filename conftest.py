"""How one pytest run executes the tests and the notebooks together, on one core or several (pytest-xdist).

The README's test command runs `tests` and `notebooks` (nbmake) with `-n 2 --dist loadgroup`: two worker
processes, each taking whole work units. The tests are small and run on one thread each, so a second worker
roughly halves the wall time. The notebooks need care, because they share one output folder:

- 01 trains stage 1 (SFT) and 02 stage 2 (the reward adapter) into `$MARL_OUTPUT_DIR/<profile>/`; 03-08 reuse
  them. So 01 and 02 form ONE work unit (the `notebook-stages` group), scheduled first, and they hold a lock
  file from the start of 01 to the end of 02. Every later notebook waits for that lock before it starts, so it
  never trains the stages a second time beside 02, or reads a half-finished stage.
- Every test file is its own work unit (module-scoped fixtures, e.g. the widget test's one kernel, run once).
- Order: 01-02, the slowest test files (beside 01-02), the later notebooks longest first, then the many short
  test files, which even out the two workers at the end.
- One thread per worker (OMP_NUM_THREADS=1, inherited by the notebook kernels): the tiny models run as fast on
  one, and two workers of two threads on two cores would spin-wait on each other.

Without xdist (a plain `pytest ...`) the same order holds and the lock is never contended.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent
STAGE_NOTEBOOKS = ("01_", "02_")
# Later notebooks, longest first (tiny profile, CI log of 2026-12-03: 04 265 s, 07 242, 06 224, 05 177, 08 145,
# 03 112); one not listed runs after these.
LATER_NOTEBOOKS = ("04_", "07_", "06_", "05_", "08_", "03_")
# The slowest test files (~420 s together of ~650 s): they run while 01-02 train the stages, so that the later
# notebooks start when the stages are there; the many short test files come last and even out the two workers.
FIRST_TESTS = ("tests/notebooks/test_notebook_widgets.py", "tests/bench/test_bench.py", "tests/ppo/test_distributed.py",
               "tests/ppo/test_ppo_checkpoint.py", "tests/model/test_architectures.py")

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


if os.environ.get("PYTEST_XDIST_WORKER"):
    # One thread per worker, for the tests and for the notebook kernels this worker starts (they inherit it):
    # two workers of two OpenMP threads each on two cores spin-wait on each other (a stage trained 4x slower).
    os.environ["OMP_NUM_THREADS"] = "1"


def pytest_itemcollected(item):
    # Marked as each item is collected: xdist reads the marks in its own pytest_collection_modifyitems
    name = _notebook(item)
    if name is not None and name.startswith(STAGE_NOTEBOOKS):
        group = "notebook-stages"
    else:
        group = str(getattr(item, "path", item.nodeid))   # one unit per file
    item.add_marker(pytest.mark.xdist_group(group))


def pytest_collection_modifyitems(config, items):
    def rank(item):
        name = _notebook(item)
        if name is None:
            return (1, 0) if item.nodeid.startswith(FIRST_TESTS) else (3, 0)
        if name.startswith(STAGE_NOTEBOOKS):
            return (0, 0)
        later = [i for i, prefix in enumerate(LATER_NOTEBOOKS) if name.startswith(prefix)]
        return (2, later[0] if later else len(LATER_NOTEBOOKS))

    items.sort(key=rank)  # stable: tests keep their order


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
