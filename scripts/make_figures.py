"""Regenerate the notebooks' header figures and expected numbers from real runs: `python scripts/make_figures.py`.

For each notebook 01-05 (or those named: `python scripts/make_figures.py 03 05`) this

1. runs the notebook top to bottom in a fresh kernel, from an EMPTY output folder (`MARL_OUTPUT_DIR` is a new
   temporary folder), offline, with the `tiny` profile (`--profile` to change it): every number below is
   what a learner running that notebook alone would get;
2. writes the image of the cell tagged `header-figure` to `notebooks/figures/<notebook>.png`;
3. puts the line the cell tagged `header-numbers` prints, and the measured runtime (whole notebook, and the
   part spent training earlier stages in the cell tagged `earlier-stages`), between the
   `<!-- make_figures:numbers -->` / `<!-- make_figures:runtime -->` markers of the notebook's first cell;
4. records all of it, with the machine's CPU count and load, in `notebooks/figures/numbers.json`.

It also draws the four-roles diagram (`notebooks/figures/roles.png`, `marl_utils.display.roles_diagram`). It never
touches the Hub (HF_HUB_OFFLINE=1), never writes into `runs/`, and leaves the notebooks without outputs.
Runtimes are wall-clock seconds; on a machine shared with other jobs they come out longer (the header says
so; the load average is recorded in numbers.json, not in the learner's header). Notebooks run one after another, never two at once.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
FIGURES = NOTEBOOKS / "figures"
DEFAULT = ["01", "02", "03", "04", "05"]
MARKER = "<!-- make_figures:{name} -->{body}<!-- /make_figures:{name} -->"


def notebook_path(number: str) -> Path:
    found = sorted(NOTEBOOKS.glob(f"{number}_*.ipynb"))
    if len(found) != 1:
        raise SystemExit(f"no single notebook notebooks/{number}_*.ipynb (found {[p.name for p in found]})")
    return found[0]


def duration(seconds: float) -> str:
    """'45 s', '3 min 10 s' (rounded to 5 s above a minute: the runs are not more precise than that)."""
    if seconds < 60:
        return f"{seconds:.0f} s"
    seconds = 5 * round(seconds / 5)
    minutes, rest = divmod(int(seconds), 60)
    return f"{minutes} min {rest} s" if rest else f"{minutes} min"


def replace_marker(text: str, name: str, body: str) -> str:
    """Put `body` between the markers called `name` (which must be there exactly once)."""
    pattern = re.compile(re.escape(f"<!-- make_figures:{name} -->") + r".*?" + re.escape(f"<!-- /make_figures:{name} -->"),
                         re.S)
    if len(pattern.findall(text)) != 1:
        raise ValueError(f"the header must hold the marker pair make_figures:{name} exactly once")
    return pattern.sub(lambda _: MARKER.format(name=name, body=body), text)


def cells_tagged(nb, tag: str) -> list:
    return [cell for cell in nb.cells if tag in cell.get("metadata", {}).get("tags", [])]


def cell_seconds(cell) -> float:
    """Wall time of an executed cell, from the timing nbclient records in its metadata."""
    timing = cell.get("metadata", {}).get("execution", {})
    start, end = timing.get("iopub.execute_input"), timing.get("shell.execute_reply")
    if not start or not end:
        return 0.0
    parse = lambda s: datetime.fromisoformat(s.replace("Z", "+00:00"))  # noqa: E731
    return (parse(end) - parse(start)).total_seconds()


def header_png(nb) -> bytes:
    """The last PNG the `header-figure` cell shows (a live board's final picture, or a plot)."""
    images = [out["data"]["image/png"] for cell in cells_tagged(nb, "header-figure") for out in cell.get("outputs", [])
              if "image/png" in out.get("data", {})]
    if not images:
        raise ValueError("the cell tagged header-figure showed no PNG")
    return base64.b64decode(images[-1])


def header_numbers(nb) -> str:
    """The first line the `header-numbers` cell prints."""
    lines = [line for cell in cells_tagged(nb, "header-numbers") for out in cell.get("outputs", [])
             if out.get("output_type") == "stream" and out.get("name") == "stdout"
             for line in out.get("text", "").splitlines() if line.strip()]
    if not lines:
        raise ValueError("the cell tagged header-numbers printed nothing")
    return lines[0].strip()


def stderr_outputs(nb) -> list[str]:
    """'cell N: first line' for every stderr output: warnings a learner would see as pink boxes."""
    found = []
    for i, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream" and out.get("name") == "stderr" and out.get("text", "").strip():
                found.append(f"cell {i}: {out['text'].strip().splitlines()[0][:160]}")
    return found


def runtime_sentence(total: float, stages: float, cpus: int, profile: str = "tiny", load: float = 0.0) -> str:
    """The header's runtime. A shared machine makes every run slower; the load average that says how busy it
    was goes to numbers.json, not to the learner (`load` is accepted and left out of the sentence)."""
    busy = " shared with other jobs" if load >= 1.0 else ""
    sentence = f"{duration(total)} on a {cpus}-core CPU{busy} (`{profile}` profile), from an empty output folder"
    if stages >= 1:
        sentence += (f"; {duration(stages)} of it trains the earlier stages, which are reused once their notebooks "
                     f"have run (then about {duration(total - stages)})")
    return sentence + "."


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def run_notebook(path: Path, profile: str, work: Path) -> dict:
    """Execute a copy of the notebook from an empty output folder; return what its header needs."""
    import nbformat
    from nbclient import NotebookClient

    out_dir = work / path.stem
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    os.environ.update({"MARL_PROFILE": profile, "MARL_OUTPUT_DIR": str(out_dir), "HF_HUB_OFFLINE": "1",
                       "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    nb = nbformat.read(path, as_version=4)
    print(f"{path.name}: running from an empty output folder {out_dir} ...", flush=True)
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    NotebookClient(nb, timeout=1800, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    total = time.perf_counter() - start
    stages = sum(cell_seconds(cell) for cell in cells_tagged(nb, "earlier-stages"))
    result = {"numbers": header_numbers(nb), "seconds": round(total, 1), "earlier_stages_seconds": round(stages, 1),
              "load_average_before": round(load_before, 2), "load_average_after": round(os.getloadavg()[0], 2),
              "stderr": stderr_outputs(nb)}
    write_atomic(FIGURES / f"{path.stem}.png", header_png(nb))
    return result


def update_header(path: Path, result: dict, cpus: int, profile: str) -> None:
    import nbformat

    nb = nbformat.read(path, as_version=4)
    header = nb.cells[0]
    text = replace_marker(header.source, "numbers", result["numbers"])
    header.source = replace_marker(text, "runtime", runtime_sentence(result["seconds"], result["earlier_stages_seconds"],
                                                                     cpus, profile, result["load_average_before"]))
    nbformat.write(nb, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*", default=DEFAULT, help="notebook numbers (default: 01 02 03 04 05)")
    parser.add_argument("--profile", default="tiny", help="MARL_PROFILE for the runs (default: tiny, offline)")
    parser.add_argument("--work-dir", help="where the empty output folders go (default: a new temporary folder)")
    parser.add_argument("--headers-only", action="store_true",
                        help="rewrite the headers from notebooks/figures/numbers.json without running anything")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(ROOT))
    from marl_utils.display.roles_diagram import draw_roles_diagram

    numbers_file = FIGURES / "numbers.json"
    record = json.loads(numbers_file.read_text()) if numbers_file.exists() else {}
    cpus = os.cpu_count() or 1
    if args.headers_only:
        for number in args.notebooks:
            path = notebook_path(number)
            update_header(path, record[path.stem], record[path.stem]["cpus"], record[path.stem]["profile"])
            print("rewrote the header of", path.name)
        return 0
    FIGURES.mkdir(exist_ok=True)
    draw_roles_diagram(save_to=FIGURES / "roles.png")
    print("wrote", (FIGURES / "roles.png").relative_to(ROOT))
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="marl-figures-"))
    failed = []
    for number in args.notebooks:
        path = notebook_path(number)
        try:
            result = run_notebook(path, args.profile, work)
        except Exception as err:  # a failing notebook keeps its old header; the others still run
            print(f"{path.name}: FAILED, header left as it was:\n{str(err)[-2000:]}", flush=True)
            failed.append(path.name)
            continue
        update_header(path, result, cpus, args.profile)
        result.update(profile=args.profile, cpus=cpus, measured=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
        record[path.stem] = result
        write_atomic(numbers_file, (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())
        print(f"{path.name}: {result['numbers']} | {duration(result['seconds'])} (earlier stages "
              f"{duration(result['earlier_stages_seconds'])}, load average {result['load_average_before']})", flush=True)
        for line in result["stderr"]:
            print(f"  stderr output, {line}")
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    if failed:
        print("failed:", ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
