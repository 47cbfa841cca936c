"""Run the notebooks in a real JupyterLab in headless Chromium, as a learner would, then reopen each saved notebook
the next day: `python scripts/browser_check.py` (every notebook) or `python scripts/browser_check.py 03 05`.

nbmake (CI) runs the notebooks' code; it cannot see what a person sees in JupyterLab: an output that does not
render, a live curve that never redraws, "Error displaying widget" when the saved notebook is reopened. For
each notebook, in file order, with ONE output folder that starts empty (01 trains stage 1, 02 stage 2, the
later notebooks reuse them, as a learner's runs do; `--fresh` gives each notebook an empty folder of its own,
so that 03-08 train the earlier stages themselves), this script:

1. starts `jupyter lab` (this interpreter's) on a copy of `notebooks/`, with the `tiny` profile, no Hub, the
   "get notified about official Jupyter news?" pop-up switched off, and every cell rendered (no windowing);
2. opens the notebook in Chromium, waits for its kernel, and runs Run > Run All Cells;
3. while it runs, records, cell by cell, every distinct picture its outputs show (`LiveCurves` replaces one
   PNG in place: several distinct pictures in one cell = the curve updated live), and screenshots that cell;
4. when the last cell has run, saves, screenshots the page, and stops that server (and with it the kernel);
5. starts a NEW JupyterLab server, opens the saved notebook there (a new kernel: widget state from the run is
   gone, as it is the next day) and counts "Error displaying widget";
6. reads the saved file: error cells, cells that did not run, widget outputs, and any traceback or warning a
   cell printed to stderr.

It exits 1 if any notebook has an error cell, an unrun cell, a widget error after reopening, a traceback or
warning on stderr, or a live board that never redrew; the last lines are a table (notebook, seconds, error
cells, widget errors after reopening) for the README. Screenshots go to the folder printed first (`--shots`,
default: a new temporary folder). Needs JupyterLab and the Python package `playwright` in this interpreter
(`pip install playwright`; no browser download: it drives Debian's `/usr/bin/chromium`, `apt-get install
chromium`, or `--chromium` for another path). Not part of CI (no browser there). Takes a while: each notebook
runs at the tiny profile's full size.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
# what on a cell's stderr means something went wrong: a traceback, or a warning (UserWarning:, WARNING ...)
STDERR_TROUBLE = re.compile(r"Traceback|Warning\b|WARNING")

# JupyterLab user settings for the servers this script starts (never the user's own)
LAB_SETTINGS = {
    # no "Would you like to get notified about official Jupyter news?" toast over the screenshots
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false",
                                                                       "checkForUpdates": False},
    # render every cell, not only those in view: the run and the reopened page are read from the DOM
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_lab_settings(folder: Path) -> None:
    for name, values in LAB_SETTINGS.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))


class Lab:
    """One `jupyter lab` server on a free port, over `work`; stopping it stops its kernels."""

    def __init__(self, work: Path, out: Path, log_name: str):
        self.port, self.token = free_port(), "marl-browser-check"
        env = dict(os.environ, MARL_PROFILE="tiny", MARL_OUTPUT_DIR=str(out), HF_HUB_OFFLINE="1",
                   HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   JUPYTERLAB_SETTINGS_DIR=str(work / "lab-settings"),
                   # a workspace of its own: a shared one reopens the tabs of earlier notebooks (and their kernels)
                   JUPYTERLAB_WORKSPACES_DIR=str(work / "lab-workspaces" / log_name.removesuffix(".log")))
        self.log = open(work / log_name, "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--port={self.port}",
             f"--IdentityProvider.token={self.token}", "--ServerApp.ip=127.0.0.1", f"--ServerApp.root_dir={work}",
             "--LabApp.news_url=", "--ServerApp.allow_root=True",
             "--LabApp.expose_app_in_browser=True"],   # window.jupyterapp: run commands without menu clicks
            env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self._wait_until_listening()

    def _wait_until_listening(self, timeout_s: float = 120) -> None:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            if self.process.poll() is not None:
                raise RuntimeError(f"jupyter lab exited with {self.process.returncode}; see {self.log.name}")
            time.sleep(1)
        raise RuntimeError(f"jupyter lab did not listen on port {self.port} within {timeout_s:.0f} s")

    def url(self, notebook: str) -> str:
        return f"http://127.0.0.1:{self.port}/lab/tree/notebooks/{notebook}?token={self.token}"

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


# the src of every picture in each cell's outputs (a LiveCurves board replaces its one picture in place)
PICTURES_PER_CELL = "cells => cells.map(c => [...c.querySelectorAll('.jp-OutputArea-output img')].map(i => i.src))"
BROWSER_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def open_notebook(p, chromium: str, url: str):
    browser = p.chromium.launch(executable_path=chromium, headless=True, args=BROWSER_FLAGS)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(url)
    page.wait_for_selector(".jp-Notebook", timeout=120_000)
    page.wait_for_function("() => window.jupyterapp && window.jupyterapp.shell.currentWidget && "
                           "window.jupyterapp.shell.currentWidget.sessionContext && "
                           "window.jupyterapp.shell.currentWidget.sessionContext.session && "
                           "window.jupyterapp.shell.currentWidget.sessionContext.session.kernel && "
                           "window.jupyterapp.shell.currentWidget.sessionContext.session.kernel.status === 'idle'",
                           timeout=300_000)   # the notebook is the current widget and its kernel is up
    time.sleep(2)
    return browser, page


# execution counts of the code cells as JupyterLab shows them: "[ ]:" not run, "[*]:" running or queued
PROMPTS = "els => els.map(e => e.textContent.trim())"


def start_run_all(page, tries: int = 3) -> None:
    """Run > Run All Cells, as a command (a menu click on a busy machine can land before the item is enabled);
    retried until a cell is queued or running."""
    for _ in range(tries):
        # a block body returns nothing: returning execute()'s promise would make Playwright wait for the whole run
        page.evaluate("() => { window.jupyterapp.commands.execute('notebook:run-all-cells'); }")
        deadline = time.time() + 60
        while time.time() < deadline:
            prompts = page.eval_on_selector_all(".jp-CodeCell .jp-InputPrompt", PROMPTS)
            if any(p not in ("[ ]:", "") for p in prompts):
                return
            time.sleep(2)
    raise RuntimeError(f"Run All Cells did not start a cell in {tries} tries")


def run_all(url: str, name: str, shots: Path, chromium: str, timeout_s: float) -> dict:
    """Run All in the browser, watching the pictures; save; return what was seen."""
    from playwright.sync_api import sync_playwright

    report = {"screenshots": []}
    with sync_playwright() as p:
        browser, page = open_notebook(p, chromium, url)
        started, pictures, last_shot = time.time(), {}, 0.0
        start_run_all(page)
        while time.time() - started < timeout_s:
            shown = page.eval_on_selector_all(".jp-Notebook .jp-Cell", PICTURES_PER_CELL)
            for cell, srcs in enumerate(shown):
                for src in srcs:
                    pictures.setdefault(cell, set()).add(hashlib.sha1(src.encode()).hexdigest())
            live = max(pictures, key=lambda c: len(pictures[c]), default=None)
            if live is not None and len(pictures[live]) > 1 and time.time() - last_shot > 20:
                shot = shots / f"{name}-cell{live}-{len(report['screenshots']):02d}.png"
                cell = page.locator(".jp-Notebook .jp-Cell").nth(live)
                cell.scroll_into_view_if_needed()
                cell.screenshot(path=str(shot))   # the cell whose picture changes: the live board
                report["screenshots"].append(str(shot))
                last_shot = time.time()
            counts = page.eval_on_selector_all(".jp-CodeCell .jp-InputPrompt", PROMPTS)
            if counts and all(c not in ("[ ]:", "[*]:", "") for c in counts):
                break  # every code cell shows an execution count: the run is over
            if page.query_selector(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr'] "
                                   ":text('Traceback')"):
                break  # an error stops Run All
            time.sleep(2)
        report["seconds"] = round(time.time() - started, 1)
        live = max(pictures, key=lambda c: len(pictures[c]), default=None)
        report["live_cell"] = live
        report["live_pictures"] = len(pictures[live]) if live is not None else 0
        page.keyboard.press("Control+s")
        time.sleep(3)
        shot = shots / f"{name}-done.png"
        page.screenshot(path=str(shot), full_page=True)
        report["screenshots"].append(str(shot))
        browser.close()
    return report


def reopen(url: str, name: str, shots: Path, chromium: str) -> tuple[int, str]:
    """Open the saved notebook in a browser on a NEW server; (count of 'Error displaying widget', screenshot)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser, page = open_notebook(p, chromium, url)
        time.sleep(5)   # outputs render after the kernel is up
        errors = page.locator(":text('Error displaying widget')").count()
        shot = shots / f"{name}-reopened.png"
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    return errors, str(shot)


def read_saved(path: Path) -> dict:
    """What the saved file holds: error cells, unrun cells, widget outputs, stderr trouble (code cell numbers)."""
    code = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    stderr = []
    for i, cell in enumerate(code):
        for output in cell["outputs"]:
            text = "".join(output.get("text", "")) if output.get("name") == "stderr" else ""
            if STDERR_TROUBLE.search(text):
                line = next(line for line in text.splitlines() if STDERR_TROUBLE.search(line))
                stderr.append(f"code cell {i}: {line.strip()[:160]}")
    return {
        "error_cells": [i for i, c in enumerate(code) if any(o["output_type"] == "error" for o in c["outputs"])],
        "cells_not_run": [i for i, c in enumerate(code) if not c.get("execution_count")],
        "widget_outputs": [i for i, c in enumerate(code) if any(WIDGET_MIME in o.get("data", {}) for o in c["outputs"])],
        "stderr_trouble": stderr,
        "has_live_board": any("LiveCurves(" in "".join(c["source"]) for c in code),
    }


def check_notebook(path: Path, work: Path, out: Path, shots: Path, chromium: str, timeout_s: float) -> dict:
    """Run, save, reopen in a new server, read the file; a failure of the driving itself is one more problem."""
    try:
        return _check_notebook(path, work, out, shots, chromium, timeout_s)
    except Exception as err:   # a timeout in the browser, a server that did not start: report it, go on
        return {"seconds": float("nan"), "live_cell": None, "live_pictures": 0, "error_cells": [],
                "widget_errors_after_reopen": -1, "stderr_trouble": [], "screenshots": [],
                "problems": [f"the check itself failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}"]}


def _check_notebook(path: Path, work: Path, out: Path, shots: Path, chromium: str, timeout_s: float) -> dict:
    lab = Lab(work, out, f"lab-{path.stem}-run.log")
    try:
        report = run_all(lab.url(path.name), path.stem, shots, chromium, timeout_s)
    finally:
        lab.stop()
    report.update(read_saved(work / "notebooks" / path.name))
    lab = Lab(work, out, f"lab-{path.stem}-reopen.log")   # the next day: a new server, a new kernel
    try:
        report["widget_errors_after_reopen"], shot = reopen(lab.url(path.name), path.stem, shots, chromium)
        report["screenshots"].append(shot)
    finally:
        lab.stop()
    problems = []
    if report["error_cells"]:
        problems.append(f"error cells {report['error_cells']}")
    if report["cells_not_run"]:
        problems.append(f"cells not run {report['cells_not_run']}")
    if report["widget_errors_after_reopen"] or report["widget_outputs"]:
        problems.append(f"{report['widget_errors_after_reopen']} 'Error displaying widget' after reopening, widget "
                        f"outputs saved in cells {report['widget_outputs']}")
    if report["stderr_trouble"]:
        problems.append("stderr: " + "; ".join(report["stderr_trouble"]))
    if report["has_live_board"] and report["live_pictures"] < 2:
        problems.append(f"the live board never redrew ({report['live_pictures']} picture(s))")
    report["problems"] = problems
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*", help="notebook numbers, e.g. 03 05 (default: every notebook)")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--shots", help="folder for screenshots (default: a new temporary folder)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds to wait for Run All, per notebook")
    parser.add_argument("--fresh", action="store_true", help="an empty output folder for each notebook")
    parser.add_argument("--out", help="use this output folder (its finished stages are reused) instead of an empty one")
    args = parser.parse_args(argv)

    every = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    paths = [p for p in every if not args.notebooks or p.name[:2] in {n.zfill(2) for n in args.notebooks}]
    unknown = {n.zfill(2) for n in args.notebooks} - {p.name[:2] for p in every}
    if unknown or not paths:
        parser.error(f"no notebook numbered {sorted(unknown)}; there are {[p.name[:2] for p in every]}")
    if not Path(args.chromium).exists():
        parser.error(f"no Chromium at {args.chromium}: `apt-get install chromium`, or pass --chromium PATH")
    work = Path(tempfile.mkdtemp(prefix="marl-browser-"))
    shutil.copytree(ROOT / "notebooks", work / "notebooks")
    write_lab_settings(work / "lab-settings")
    shots = Path(args.shots or work / "shots").resolve()
    shots.mkdir(parents=True, exist_ok=True)
    print(f"screenshots: {shots}\nserver logs and the saved notebooks: {work}", flush=True)

    reports = {}
    for path in paths:
        out = Path(args.out) if args.out else work / ("out-" + path.stem if args.fresh else "out")
        report = check_notebook(path, work, out, shots, args.chromium, args.timeout)
        reports[path.name] = report
        print(json.dumps({k: v for k, v in report.items() if k != "screenshots"}), flush=True)
        print("FAIL" if report["problems"] else "OK", f"{path.name}: {report['seconds']} s in JupyterLab; "
              f"{report['live_pictures']} distinct pictures shown in turn by cell {report['live_cell']}; "
              + ("; ".join(report["problems"]) or "no error cell, no widget error after reopening"), flush=True)

    print("\n| notebook | seconds | error cells | widget errors after reopening | stderr warnings | result |")
    print("|---|---|---|---|---|---|")
    for name, r in reports.items():
        print(f"| {name} | {r['seconds']:.0f} | {len(r['error_cells'])} | {r['widget_errors_after_reopen']} | "
              f"{len(r['stderr_trouble'])} | {'FAIL' if r['problems'] else 'OK'} |")
    return 1 if any(r["problems"] for r in reports.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
