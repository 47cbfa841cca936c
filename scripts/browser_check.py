"""Run a notebook in a real JupyterLab in headless Chromium, as a learner would: `python scripts/browser_check.py 03`.

nbmake (CI) runs the notebooks' code; it cannot see what a person sees in JupyterLab: an output that does not
render, a live curve that never redraws, "Error displaying widget" when the saved notebook is reopened. This
script checks those, for one notebook:

1. starts `jupyter lab` (this interpreter's) on a copy of `notebooks/` with an EMPTY output folder, the `tiny`
   profile and no Hub;
2. opens the notebook in Chromium, waits for the kernel, and clicks Run > Run All Cells;
3. while it runs, records, cell by cell, every distinct picture its outputs show (`LiveCurves` replaces one
   PNG in place: several distinct pictures in one cell = the curve updated live), and screenshots that cell;
4. when the last cell has run, saves, and reports cells with an error output;
5. reloads the page (the saved notebook reopened) and looks for "Error displaying widget".

It exits 1 if an error cell appears, the live picture never changed, or a reopened output fails to render.
Needs JupyterLab and the Python package `playwright` in this interpreter (`pip install playwright`; no browser
download: it drives Debian's `/usr/bin/chromium`, `--chromium` for another path).
Screenshots go to `--shots` (default: a new temporary folder). Not part of CI (no browser there).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_lab(work: Path, port: int, token: str) -> subprocess.Popen:
    env = dict(os.environ, MARL_PROFILE="tiny", MARL_OUTPUT_DIR=str(work / "out"), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    log = open(work / "lab.log", "w")
    return subprocess.Popen([sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--port={port}",
                             f"--IdentityProvider.token={token}", "--ServerApp.ip=127.0.0.1",
                             f"--ServerApp.root_dir={work}", "--LabApp.news_url=", "--ServerApp.allow_root=True"],
                            env=env, stdout=log, stderr=subprocess.STDOUT)


# the src of every picture in each cell's outputs (a LiveCurves board replaces its one picture in place)
PICTURES_PER_CELL = "cells => cells.map(c => [...c.querySelectorAll('.jp-OutputArea-output img')].map(i => i.src))"


def drive(url: str, name: str, shots: Path, chromium: str, timeout_s: float) -> dict:
    from playwright.sync_api import sync_playwright

    flags = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync"]
    report = {"live_pictures": 0, "error_cells": [], "widget_errors_after_reopen": 0, "screenshots": []}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=flags)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(url)
        page.wait_for_selector(".jp-Notebook", timeout=120_000)
        page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle'], "
                               "#jp-main-statusbar :text('Idle')", timeout=180_000)
        time.sleep(2)
        page.click("div.lm-MenuBar-itemLabel:text-is('Run')")
        page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
        started, pictures, last_shot = time.time(), {}, 0.0
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
            counts = page.eval_on_selector_all(
                ".jp-CodeCell .jp-InputPrompt", "els => els.map(e => e.textContent.trim())")
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
        page.reload()
        page.wait_for_selector(".jp-Notebook", timeout=120_000)
        time.sleep(5)
        report["widget_errors_after_reopen"] = page.locator(":text('Error displaying widget')").count()
        browser.close()
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebook", help="notebook number, e.g. 03")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--shots", help="folder for screenshots (default: a new temporary folder)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds to wait for Run All (default 1800)")
    args = parser.parse_args(argv)

    [path] = sorted((ROOT / "notebooks").glob(f"{args.notebook}_*.ipynb"))
    work = Path(tempfile.mkdtemp(prefix="marl-browser-"))
    shutil.copytree(ROOT / "notebooks", work / "notebooks")
    shots = Path(args.shots or work / "shots")
    shots.mkdir(parents=True, exist_ok=True)
    port, token = free_port(), "marl-browser-check"
    lab = start_lab(work, port, token)
    try:
        time.sleep(8)
        url = f"http://127.0.0.1:{port}/lab/tree/notebooks/{path.name}?token={token}"
        report = drive(url, path.stem, shots, args.chromium, args.timeout)
    finally:
        lab.terminate()
        lab.wait(timeout=30)
    saved = json.loads((work / "notebooks" / path.name).read_text())
    code = [c for c in saved["cells"] if c["cell_type"] == "code"]
    report["error_cells"] = [i for i, c in enumerate(code) if any(o["output_type"] == "error" for o in c["outputs"])]
    report["cells_not_run"] = [i for i, c in enumerate(code) if not c.get("execution_count")]
    print(json.dumps(report, indent=1))
    ok = (not report["error_cells"] and not report["cells_not_run"] and report["live_pictures"] >= 3
          and report["widget_errors_after_reopen"] == 0)
    print("OK" if ok else "FAIL", f"{path.name}: {report['seconds']} s in JupyterLab, "
          f"{report['live_pictures']} distinct pictures shown in turn by cell {report['live_cell']} while it ran, error cells {report['error_cells']}, "
          f"'Error displaying widget' after reopening: {report['widget_errors_after_reopen']}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
