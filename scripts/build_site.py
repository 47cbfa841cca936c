"""Build the executed notebooks as a static site a reader opens without running anything: `python scripts/build_site.py`.

Every notebook (or those named: `python scripts/build_site.py 01 03`) runs top to bottom in a fresh Jupyter
kernel on the `tiny` profile (offline, a 2-core CPU is enough), in file order and with ONE output folder, as a
learner's first run goes: 01 trains stage 1, 02 stage 2, the later notebooks reuse them. Each executed notebook
becomes an HTML page (nbconvert's JupyterLab look) beside a copy of the executed `.ipynb`, and an index page links
them with their runtimes. The site goes to `site/` (`--out`); serve it (`python -m http.server -d site`, then
http://localhost:8000) or publish the folder as it is (GitHub Pages). Opened from disk the pages read fine, but
Chromium refuses MathJax's fonts to a file:// page, so formulas may look plainer there.

The pages work offline: the notebooks' figures are copied beside them, MathJax is served from the site itself
(from the `jupyter-server-mathjax` package when it is installed, else it falls back to a CDN and says so), the
Colab badge becomes a plain link, links to other notebooks point at their pages and links into the repository
(README, docs) at the repository on GitHub. `--check` then opens every page in headless Chromium (the Python
package `playwright` driving Debian's `/usr/bin/chromium`; no browser download) and fails on a page error, a
console error, a failed request, a picture that does not load or a formula MathJax left as text.

A notebook that raises stops the build with the notebook and cell named; nothing is written then (the site is
built in a temporary folder and renamed into place at the end, so `site/` is the old site or the new one). The
full build takes about as long as running every notebook (tiny: 13 minutes on a quiet 2-core CPU).
"""

from __future__ import annotations

import argparse
import html
import http.server
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = ROOT / "notebooks"
MATHJAX_CONFIG = "TeX-AMS-MML_HTMLorMML-full,Safe"
NO_FAVICON = '<link rel="icon" href="data:,">'
ASSISTIVE_MATHML_FONTS = "<style>.MJX_Assistive_MathML [mathvariant] { font-family: inherit !important; }</style>"
# MathJax 2 declares a placeholder web font at about:blank; Chromium logs that it refuses it. Harmless (the same
# happens with MathJax from its CDN), so the check does not count it.
BENIGN = ("about:blank",)
CDN_MATHJAX = "https://cdnjs.cloudflare.com/ajax/libs/mathjax/2.7.7/latest.js?config=TeX-AMS_CHTML-full,Safe"


def repository_url() -> str:
    """[project.urls] Repository of pyproject.toml: where links into the repository (docs, README) point."""
    text = (ROOT / "pyproject.toml").read_text()
    return re.search(r'^Repository\s*=\s*"([^"]+)"', text, re.M).group(1).rstrip("/")


def notebook_paths(selection: list[str] | None = None) -> list[Path]:
    """The notebooks in file order; `selection` holds name prefixes ("01", "03_multi")."""
    paths = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
    if not selection:
        return paths
    chosen = [p for p in paths if any(p.name.startswith(s) for s in selection)]
    unknown = [s for s in selection if not any(p.name.startswith(s) for p in paths)]
    if unknown:
        raise SystemExit(f"no notebook starts with {', '.join(map(repr, unknown))}; "
                         f"there are: {', '.join(p.name for p in paths)}")
    return chosen


def title_of(nb) -> str:
    """The notebook's first markdown heading, without its '#'."""
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            for line in cell.source.splitlines():
                if line.startswith("#"):
                    return line.lstrip("#").strip()
    return "notebook"


class NotebookFailed(RuntimeError):
    """A cell raised: the notebook, the cell's number and the error's last line."""


def execute(path: Path, run_dir: Path, profile: str = "tiny", prelude: str | None = None,
            timeout: int = 3600):
    """Run `path` top to bottom in a new kernel; return (executed notebook, seconds).

    `prelude` is code run first in the same kernel and removed from the result (tests use it to shrink the
    profile). The kernel starts in notebooks/, so the notebook's relative paths hold.
    """
    import nbclient
    import nbformat

    nb = nbformat.read(path, as_version=4)
    if prelude:
        nb.cells.insert(0, nbformat.v4.new_code_cell(prelude))
    env = dict(os.environ, MARL_PROFILE=profile, MARL_OUTPUT_DIR=str(run_dir), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    client = nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3", allow_errors=False,
                                     resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    start = time.perf_counter()
    try:
        client.execute(env=env)
    except nbclient.exceptions.CellExecutionError as error:
        failed = [i for i, c in enumerate(nb.cells) if any(o.get("output_type") == "error" for o in c.get("outputs", []))]
        cell = failed[0] - (1 if prelude else 0) if failed else "?"
        last = [line for line in str(error).strip().splitlines() if line.strip()][-1:]
        raise NotebookFailed(f"{path.name}, cell {cell}: {last[0] if last else error}") from None
    seconds = time.perf_counter() - start
    if prelude:
        nb.cells.pop(0)
    return nb, seconds


def to_html(nb, repo_url: str, mathjax_url: str) -> str:
    """One executed notebook as a self-contained HTML page (pictures inline), fit to be read offline."""
    from nbconvert import HTMLExporter
    from nbconvert.preprocessors import CoalesceStreamsPreprocessor

    # A progress bar redraws its line with '\r'; JupyterLab shows only the last state, so must the page.
    nb, _ = CoalesceStreamsPreprocessor().preprocess(nb, {})
    nb.metadata["title"] = title_of(nb)   # the browser tab: the notebook's heading, not its file name
    body, _ = HTMLExporter(template_name="lab", mathjax_url=mathjax_url).from_notebook_node(nb)
    # An icon of its own, or the browser asks the server for /favicon.ico (a 404 on a static host)
    body = body.replace("</head>", f"{NO_FAVICON}\n</head>", 1)
    # No widgets on these pages, so no require.js (a request the offline page would fail)
    body = re.sub(r'<script src="[^"]*require[^"]*\.js"></script>\s*', "", body)
    if not mathjax_url.startswith("http"):
        # The packaged MathJax carries the STIX-Web fonts only: say so, or it asks for its TeX fonts (missing)
        body = body.replace("MathJax.Hub.Config({", 'MathJax.Hub.Config({"HTML-CSS": {availableFonts: [], '
                            'preferredFont: null, webFont: "STIX-Web", imageFont: null},', 1)
        # MathJax also hides a MathML copy of each formula in the page for screen readers; its styles give
        # letters like \mathbb{E} the TeX fonts by name, which the browser then fetches (404). A reader never sees
        # that copy, so it keeps the page's font and asks for nothing.
        body = body.replace("</head>", f"{ASSISTIVE_MATHML_FONTS}\n</head>", 1)
    # The Colab badge is a picture from Google: a plain link instead
    body = re.sub(r'<img[^>]*colab-badge\.svg[^>]*/?>', "Open in Colab", body)

    def link(match):
        target = match.group(2)
        if re.match(r"^[a-z]+:|^#", target):
            return match.group(0)
        if re.match(r"^\d\d_[^/]*\.ipynb", target):   # another notebook: its page
            return f'{match.group(1)}{target.replace(".ipynb", ".html", 1)}"'
        if target.startswith("figures/"):
            return match.group(0)
        relative = os.path.normpath(os.path.join("notebooks", target))   # README, docs: on GitHub
        return f'{match.group(1)}{repo_url}/blob/main/{relative}"'

    return re.sub(r'(<a\s+href=")([^"]+)"', link, body)


def index_html(entries: list[dict], profile: str) -> str:
    rows = "\n".join(
        f'<tr><td><a href="{e["page"]}">{html.escape(e["title"])}</a></td>'
        f'<td><a href="{e["notebook"]}">.ipynb</a></td><td>{e["seconds"] / 60:.1f} min</td></tr>'
        for e in entries)
    when = time.strftime("%Y-%m-%d")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">{NO_FAVICON}<title>Multi-adapter RL: the notebooks, executed</title>
<style>body{{font-family:system-ui,sans-serif;max-width:52rem;margin:2rem auto;padding:0 1rem;line-height:1.5}}
table{{border-collapse:collapse}}td{{padding:.3rem .8rem;border-bottom:1px solid #ddd}}</style></head>
<body><h1>Multi-adapter RL: the notebooks, executed</h1>
<p>One base model as policy, value function, reference and reward model. Each page is a notebook run top to
bottom on the <code>{html.escape(profile)}</code> profile (offline, a 2-core CPU), in this order, sharing one output
folder: notebook 01 trains stage 1, 02 stage 2, the later ones reuse them. Read them here; to run them yourself
open the <code>.ipynb</code> in JupyterLab or Colab (each page links to Colab at the top). Built {when}.</p>
<table><tr><th>notebook</th><th>executed copy</th><th>runtime</th></tr>
{rows}
</table></body></html>
"""


def local_mathjax() -> Path | None:
    """MathJax 2's files from the `jupyter-server-mathjax` package, if installed."""
    try:
        import jupyter_server_mathjax
    except ImportError:
        return None
    static = Path(jupyter_server_mathjax.__file__).parent / "static"
    return static if (static / "MathJax.js").exists() else None


def build(paths: list[Path], out: Path, run_dir: Path | None = None, profile: str = "tiny",
          prelude: str | None = None, log=print) -> list[dict]:
    """Execute `paths` in order and write the site to `out` (replaced only when every notebook ran)."""
    import nbformat

    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    own_run_dir = run_dir is None
    run_dir = Path(tempfile.mkdtemp(prefix="marl-site-run-")) if own_run_dir else Path(run_dir)
    try:
        mathjax = local_mathjax()
        if mathjax is not None:
            shutil.copytree(mathjax, tmp / "mathjax")
            mathjax_url = f"mathjax/MathJax.js?config={MATHJAX_CONFIG}"
        else:
            mathjax_url = CDN_MATHJAX
            log("jupyter-server-mathjax is not installed: the pages load MathJax from a CDN (formulas need the "
                "internet). `pip install jupyter-server-mathjax` makes them work offline.")
        if (NOTEBOOK_DIR / "figures").is_dir():
            shutil.copytree(NOTEBOOK_DIR / "figures", tmp / "figures")
        entries, repo_url = [], repository_url()
        for path in paths:
            log(f"running {path.name} ({profile} profile) ...", flush=True)
            nb, seconds = execute(path, run_dir, profile, prelude)
            nbformat.write(nb, tmp / path.name)
            page = path.with_suffix(".html").name
            (tmp / page).write_text(to_html(nb, repo_url, mathjax_url), encoding="utf-8")
            entries.append({"title": title_of(nb), "page": page, "notebook": path.name, "seconds": seconds})
            log(f"  {page}: {seconds / 60:.1f} min", flush=True)
        (tmp / "index.html").write_text(index_html(entries, profile), encoding="utf-8")
        (tmp / "build.json").write_text(json.dumps({"profile": profile, "notebooks": entries}, indent=1))
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
        return entries
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if own_run_dir:
            shutil.rmtree(run_dir, ignore_errors=True)


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):   # no line per request on the console
        pass


def check_site(site: Path, chromium: str = "/usr/bin/chromium", log=print) -> list[str]:
    """Open every page of `site` in headless Chromium; return the problems found (empty: all good)."""
    from playwright.sync_api import sync_playwright

    problems = []
    pages = sorted(Path(site).glob("*.html"))
    # Served over http as a host would (GitHub Pages, `python -m http.server`): from file:// Chromium refuses
    # MathJax's web fonts (a page opened from disk has no origin)
    handler = partial(QuietHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}/"
    with server, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True)
        for page_path in pages:
            page = browser.new_page()
            found = []
            page.on("pageerror", lambda e: found.append(f"page error: {e}"))
            page.on("console", lambda m: found.append(f"console {m.type}: {m.text} ({m.location.get('url')})") if m.type == "error" else None)
            page.on("requestfailed", lambda r: found.append(f"request failed: {r.url}"))
            page.on("response", lambda r: found.append(f"HTTP {r.status}: {r.url}") if r.status >= 400 else None)
            page.goto(base + page_path.name, wait_until="load")
            if page_path.name != "index.html":
                # MathJax typesets after load: wait until it says it is done (or 60 s)
                page.wait_for_function("!window.MathJax || (MathJax.Hub && MathJax.Hub.queue.running === 0 "
                                       "&& MathJax.Hub.queue.pending === 0)", timeout=60_000)
            broken = page.evaluate("[...document.images].filter(i => !i.complete || i.naturalWidth === 0)"
                                   ".map(i => i.src.slice(0, 80))")
            found += [f"picture did not load: {src}" for src in broken]
            images = page.evaluate("document.images.length")
            errors = page.evaluate("document.querySelectorAll('[data-mime-type=\"application/vnd.jupyter.error\"]').length"
                                   " + document.querySelectorAll('.jp-OutputArea-output pre .ansi-red-fg').length")
            if errors:
                found.append(f"{errors} error output(s)")
            raw_math = page.evaluate("[...document.querySelectorAll('.jp-MarkdownOutput')].some("
                                     "e => /\\$[^$\\s][^$]*\\\\[a-z]+[^$]*\\$/.test(e.innerText))")
            if raw_math and page_path.name != "index.html":
                found.append("a formula was left as TeX source (MathJax did not typeset it)")
            found = [f for f in found if not any(b in f for b in BENIGN)]
            log(f"{page_path.name}: {images} pictures, " + (f"{len(found)} problem(s)" if found else "no problem"))
            problems += [f"{page_path.name}: {f}" for f in found]
            page.close()
        browser.close()
        server.shutdown()
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", help="name prefixes, e.g. 01 03 (default: every notebook)")
    parser.add_argument("--out", default=str(ROOT / "site"), help="the site's folder (default: site/)")
    parser.add_argument("--profile", default="tiny", help="the profile the notebooks run on (default: tiny)")
    parser.add_argument("--run-dir", help="output folder the notebooks share (default: a new temporary one, so "
                                          "stages 1-2 are trained as in a first run; give one to keep or reuse them)")
    parser.add_argument("--check", action="store_true", help="after building, open every page in headless Chromium")
    parser.add_argument("--check-only", action="store_true", help="only check the site already in --out")
    parser.add_argument("--chromium", default="/usr/bin/chromium", help="the Chromium binary for --check")
    args = parser.parse_args(argv)

    if not args.check_only:
        paths = notebook_paths(args.notebooks)
        try:
            build(paths, Path(args.out), Path(args.run_dir) if args.run_dir else None, args.profile)
        except NotebookFailed as failure:
            print(f"a notebook failed, the site was not written: {failure}", file=sys.stderr)
            return 1
        print(f"site written: {Path(args.out) / 'index.html'}")
    if args.check or args.check_only:
        if args.check_only and not (Path(args.out) / "index.html").exists():
            print(f"no site in {args.out}: build it first (python scripts/build_site.py)", file=sys.stderr)
            return 2
        problems = check_site(Path(args.out), args.chromium)
        for problem in problems:
            print("PROBLEM", problem)
        print("headless Chromium: " + ("every page clean" if not problems else f"{len(problems)} problem(s)"))
        return 1 if problems else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
