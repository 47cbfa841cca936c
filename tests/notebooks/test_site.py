"""scripts/build_site.py: one notebook built into a static page, and a failing notebook leaves the old site alone.

The full site runs every notebook at the tiny profile's size (~40 minutes); here notebook 01 runs on a shrunken
profile (the widget test's first cell, with 01's learning bars opened: four SFT steps learn little, and whether
they do is nbmake's business, not the site's), through the script's own functions.
"""

import json
import re
import shutil
from pathlib import Path

import pytest

from script_loader import load_script
from small_profiles import SHRUNK_TINY_CELL

pytest.importorskip("nbclient")
pytest.importorskip("nbconvert")

PRELUDE = SHRUNK_TINY_CELL + """
_profiles.PROFILES["tiny"] = _profiles.PROFILES["tiny"].replace(sft_max_perplexity=1e9, sft_min_perplexity_drop=10.0)
"""


@pytest.fixture(scope="module")
def build_site():
    return load_script("build_site")


@pytest.fixture(scope="module")
def site(build_site, tmp_path_factory):
    base = tmp_path_factory.mktemp("site-build")
    entries = build_site.build(build_site.notebook_paths(["01"]), base / "site", run_dir=base / "run",
                               prelude=PRELUDE, log=lambda *a, **k: None)
    return base, entries


def test_one_notebook_becomes_a_page_and_an_index(site, build_site):
    base, entries = site
    out = base / "site"
    assert [e["page"] for e in entries] == ["01_sft_imdb.html"] and entries[0]["seconds"] > 0
    index = (out / "index.html").read_text()
    assert 'href="01_sft_imdb.html"' in index and 'href="01_sft_imdb.ipynb"' in index
    page = (out / "01_sft_imdb.html").read_text()
    assert entries[0]["title"].startswith("01 ") and f"<title>{entries[0]['title']}</title>" in page
    assert "data:image/png;base64," in page                          # the notebook's own figures, inline
    for src in re.findall(r'<img[^>]+src="([^":]+)"', page):           # header figures: copied beside the page
        assert (out / src).is_file(), src
    assert "_profiles.PROFILES" not in page                             # the test's prelude is not on the page
    assert "require.min.js" not in page and "colab-badge.svg" not in page
    assert not re.search(r'href="\.\./', page)                          # repository links point at GitHub
    if build_site.local_mathjax() is not None:                          # formulas typeset offline
        assert 'src="mathjax/MathJax.js' in page and (out / "mathjax" / "MathJax.js").is_file()
    executed = json.loads((out / "01_sft_imdb.ipynb").read_text())
    code = [c for c in executed["cells"] if c["cell_type"] == "code"]
    assert code and all(c["execution_count"] for c in code)
    assert not any(o["output_type"] == "error" for c in code for o in c["outputs"])
    assert not list(base.glob(".site.tmp-*"))


def test_a_failing_notebook_names_the_cell_and_keeps_the_old_site(site, build_site, tmp_path):
    base, _ = site
    out = base / "site"
    before = (out / "index.html").read_text()
    nb = {"cells": [{"cell_type": "markdown", "metadata": {}, "source": "# Broken"},
                    {"cell_type": "code", "metadata": {}, "execution_count": None, "outputs": [], "source": "x = 1"},
                    {"cell_type": "code", "metadata": {}, "execution_count": None, "outputs": [],
                     "source": "raise ValueError('a broken cell')"}],
          "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
          "nbformat": 4, "nbformat_minor": 5}
    broken = tmp_path / "99_broken.ipynb"
    broken.write_text(json.dumps(nb))
    with pytest.raises(build_site.NotebookFailed, match=r"99_broken\.ipynb, cell 2: .*a broken cell"):
        build_site.build([broken], out, run_dir=tmp_path / "run", log=lambda *a, **k: None)
    assert (out / "index.html").read_text() == before
    assert not list(base.glob(".site.tmp-*"))


def test_a_redrawn_progress_line_shows_its_last_state(build_site):
    import nbformat

    cell = nbformat.v4.new_code_cell("pass")
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text="\rSFT:  10%|# | 1/10"),
                    nbformat.v4.new_output("stream", name="stdout", text="\rSFT: 100%|##| 10/10 done\n")]
    page = build_site.to_html(nbformat.v4.new_notebook(cells=[cell]), "https://example.org/repo", "mathjax/MathJax.js")
    assert "10/10 done" in page and "1/10" not in page


FORMULA = r"The objective $\mathbb{E}[r] - \beta\,\mathrm{KL}$ and $\mathcal{L}$."   # AMS and script letters


def formula_page(build_site):
    import nbformat

    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell(FORMULA)])
    return build_site.to_html(notebook, "https://example.org/repo",
                              f"mathjax/MathJax.js?config={build_site.MATHJAX_CONFIG}")


def test_the_hidden_mathml_copy_keeps_the_page_font(build_site):
    # MathJax hides a MathML copy of each formula for screen readers, styled with TeX fonts the packaged
    # MathJax does not have (a 404 per font): the page gives that copy its own font
    assert build_site.ASSISTIVE_MATHML_FONTS in formula_page(build_site)


def test_a_page_with_formulas_opens_in_chromium_without_a_problem(build_site, tmp_path):
    pytest.importorskip("playwright", reason="the browser check needs playwright (pip install -e '.[site]')")
    if not Path("/usr/bin/chromium").exists():
        pytest.skip("no /usr/bin/chromium (Debian: apt-get install chromium)")
    mathjax = build_site.local_mathjax()
    if mathjax is None:
        pytest.skip("jupyter-server-mathjax is not installed (pip install -e '.[site]')")
    site = tmp_path / "site"
    shutil.copytree(mathjax, site / "mathjax")
    (site / "formula.html").write_text(formula_page(build_site), encoding="utf-8")
    assert build_site.check_site(site, log=lambda *a, **k: None) == []
