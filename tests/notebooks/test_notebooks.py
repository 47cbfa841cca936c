"""The notebooks as files: URLs, stripped outputs, bars from the profile, header figures (seconds, no kernel).

nbmake runs the notebooks; these tests read them, so a wrong Colab URL, a committed output, a hard-coded bar or
a missing header figure fails fast and says where.
"""

import ast
import json
import re
from dataclasses import fields
from pathlib import Path

import pytest

from marl_utils.infra.profiles import Profile
from script_loader import load_script

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
WITH_HEADER_FIGURE = [p for p in NOTEBOOKS if p.name[:2] in {"01", "02", "03", "04", "05"}]


def repository_url() -> str:
    """[project.urls] Repository of pyproject.toml (tomllib from Python 3.11; a plain match before)."""
    text = (ROOT / "pyproject.toml").read_text()
    try:
        import tomllib
    except ImportError:
        return re.search(r'^\[project\.urls\][^\[]*?^Repository\s*=\s*"([^"]+)"', text, re.M | re.S).group(1)
    return tomllib.loads(text)["project"]["urls"]["Repository"]


REPOSITORY = repository_url()
PROFILE_NAMES = {f.name for f in fields(Profile)} | {name for name in dir(Profile) if not name.startswith("_")}


def cells(path, kind=None):
    nb = json.loads(path.read_text())
    return [c for c in nb["cells"] if kind is None or c["cell_type"] == kind]


def source(cell) -> str:
    return "".join(cell["source"])


def code_of(path) -> list[tuple[int, str]]:
    """(cell index, code) of every code cell, IPython magics and shell lines blanked so that ast can parse it."""
    out = []
    for i, cell in enumerate(cells(path)):
        if cell["cell_type"] == "code":
            code = "\n".join("" if line.lstrip().startswith(("%", "!")) else line for line in source(cell).splitlines())
            out.append((i, code))
    return out


def test_there_are_notebooks():
    assert len(WITH_HEADER_FIGURE) == 5, [p.name for p in NOTEBOOKS]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_colab_badge_and_clone_url_match_pyproject(path):
    text = "".join(source(c) for c in cells(path))
    owner_repo = REPOSITORY.removeprefix("https://github.com/")
    badges = re.findall(r"https://colab\.research\.google\.com/github/[^\s\"')]+", text)
    assert badges, f"{path.name} has no Colab badge"
    assert set(badges) == {f"https://colab.research.google.com/github/{owner_repo}/blob/main/notebooks/{path.name}"}, badges
    clones = re.findall(r"https://github\.com/[^\s\"')]+", text)
    assert clones and set(clones) == {REPOSITORY}, f"{path.name}: clone URLs {clones} != [project.urls] {REPOSITORY}"
    folder = REPOSITORY.rsplit("/", 1)[-1]
    assert f'"{folder}"' in text, f"{path.name} must install from the clone's folder {folder!r}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_without_outputs(path):
    dirty = [i for i, c in enumerate(cells(path)) if c["cell_type"] == "code" and (c["outputs"] or c["execution_count"])]
    assert not dirty, f"{path.name}: cells {dirty} hold outputs; run `jupyter nbconvert --clear-output --inplace {path}`"


def numbers_in(node) -> list:
    """Number literals of an expression, arithmetic included (0.75 * n), not inside an index or a call's
    arguments (x[2], round(x, 2): those are not thresholds)."""
    if isinstance(node, ast.Constant):
        return [node.value] if type(node.value) in (int, float) else []
    if isinstance(node, (ast.Subscript, ast.Call)):
        return []
    return [n for child in ast.iter_child_nodes(node) for n in numbers_in(child)]


def literal_bars(code: str) -> list[str]:
    """Asserts that compare with a number literal (other than 0 and 1) on a line without '# not a bar'."""
    lines = code.splitlines()
    found = []
    for node in ast.walk(ast.parse(code)):
        if not isinstance(node, ast.Assert):
            continue
        for compare in (n for n in ast.walk(node.test) if isinstance(n, ast.Compare)):
            numbers = [n for side in [compare.left, *compare.comparators] for n in numbers_in(side)]
            if any(n not in (0, 1) for n in numbers):
                statement = "\n".join(lines[node.lineno - 1:node.end_lineno])
                if "not a bar" not in statement:
                    found.append(statement.strip())
    return found


def test_literal_bar_detector():
    assert literal_bars("assert gain >= 1.5") == ["assert gain >= 1.5"]
    assert literal_bars("assert kl <= -0.5, kl") == ["assert kl <= -0.5, kl"]
    assert literal_bars("assert gain >= profile.ppo_min_reward_gain") == []
    assert literal_bars("assert gap <= 1e-6   # not a bar: float rounding") == []
    assert literal_bars("assert len(x) > 0 and y == 1") == []
    assert literal_bars("assert n >= 0.75 * config.max_new_tokens") == ["assert n >= 0.75 * config.max_new_tokens"]
    assert literal_bars("assert x[2] < round(y, 3)") == []


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_asserts_read_their_bars_from_the_profile(path):
    offenders = {i: literal_bars(code) for i, code in code_of(path)}
    offenders = {i: found for i, found in offenders.items() if found}
    assert not offenders, (f"{path.name}: asserts with hard-coded bars {offenders}; read the bar from a profile "
                           "field (or say '# not a bar: <why>' for a tolerance or a format fact)")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_profile_fields_used_in_notebooks_exist(path):
    used = {m for _, code in code_of(path) for m in re.findall(r"\bprofile\.([A-Za-z_]+)", code)}
    assert used <= PROFILE_NAMES, f"{path.name} reads profile fields that do not exist: {sorted(used - PROFILE_NAMES)}"


@pytest.mark.parametrize("path", WITH_HEADER_FIGURE, ids=lambda p: p.name)
def test_header_embeds_a_figure_and_measured_numbers(path):
    header = source(cells(path)[0])
    images = re.findall(r"!\[[^\]]*\]\((figures/[^)]+\.png)\)", header)
    assert images == [f"figures/{path.stem}.png"], images
    assert (NOTEBOOK_DIR / images[0]).stat().st_size > 5000, "the header figure is missing or empty"
    assert "scripts/make_figures.py" in header
    for name in ("numbers", "runtime"):
        body = re.search(rf"<!-- make_figures:{name} -->(.*?)<!-- /make_figures:{name} -->", header, re.S)
        assert body and body.group(1).strip() and "not measured" not in body.group(1), \
            f"{path.name}: run `python scripts/make_figures.py {path.name[:2]}` to fill in the {name}"
    tags = {tag for c in cells(path) for tag in c["metadata"].get("tags", [])}
    assert {"header-figure", "header-numbers"} <= tags, f"{path.name}: make_figures.py needs these cell tags"


def test_roles_diagram_is_in_the_readme_and_notebook_03():
    assert (NOTEBOOK_DIR / "figures" / "roles.png").stat().st_size > 5000
    assert "notebooks/figures/roles.png" in (ROOT / "README.md").read_text()
    assert any("](figures/roles.png)" in source(c) for c in cells(NOTEBOOK_DIR / "03_multi_adapter_ppo.ipynb", "markdown"))


@pytest.fixture(scope="module")
def make_figures():
    return load_script("make_figures")


def test_make_figures_fills_the_header_markers(make_figures):
    header = ("intro\n<!-- make_figures:numbers -->old<!-- /make_figures:numbers -->\n"
              "**Runtime.** <!-- make_figures:runtime -->(not measured yet)<!-- /make_figures:runtime --> more")
    text = make_figures.replace_marker(header, "numbers", "reward -0.26 -> 2.17")
    text = make_figures.replace_marker(text, "runtime", make_figures.runtime_sentence(190, 95, 2))
    assert "load average" not in text  # an idle machine needs no remark
    busy = make_figures.runtime_sentence(190, 95, 2, load=3.66)
    assert "load average" not in busy and "2-core CPU shared with other jobs" in busy  # the load goes to numbers.json
    assert "<!-- make_figures:numbers -->reward -0.26 -> 2.17<!-- /make_figures:numbers -->" in text
    assert "3 min 10 s on a 2-core CPU" in text and "1 min 35 s of it trains the earlier stages" in text
    assert text.endswith(" more") and text.startswith("intro\n")
    with pytest.raises(ValueError, match="exactly once"):
        make_figures.replace_marker("no markers here", "numbers", "x")


def test_make_figures_reads_tagged_outputs(make_figures):
    import base64

    import nbformat

    png = b"\x89PNG fake"
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("train()", metadata={"tags": ["header-figure"]}, outputs=[
            nbformat.v4.new_output("display_data", data={"image/png": base64.b64encode(b"old").decode()}),
            nbformat.v4.new_output("display_data", data={"image/png": base64.b64encode(png).decode()})]),
        nbformat.v4.new_code_cell("check()", metadata={"tags": ["header-numbers"]}, outputs=[
            nbformat.v4.new_output("stream", name="stderr", text="a warning\n"),
            nbformat.v4.new_output("stream", name="stdout", text="\neval reward 0.1 -> 2.0\nmore\n")]),
    ])
    assert make_figures.header_png(nb) == png
    assert make_figures.header_numbers(nb) == "eval reward 0.1 -> 2.0"
    assert make_figures.stderr_outputs(nb) == ["cell 1: a warning"]
    assert make_figures.duration(44.6) == "45 s" and make_figures.duration(121) == "2 min"


def test_known_library_log_records_are_dropped_and_others_kept(caplog):
    import logging

    import marl_utils  # noqa: F401 - installs the filters on import

    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING):
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please ...", "No module")
        logger.warning("something new")
        logging.getLogger("bitsandbytes.autograd._functions").warning(
            "MatMul8bitLt: inputs will be cast from %s to float16 during quantization", "torch.float32")
    assert [r.getMessage() for r in caplog.records] == ["something new"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_threads_are_set_by_the_helper_that_decides(path):
    """`torch.set_num_threads(1)` is right for the tiny model on a CPU and slow for a bigger one: notebooks call
    `notebook_helpers.set_cpu_threads(model)`, which decides from the model's size and device."""
    calls = [i for i, code in code_of(path) if "set_num_threads(" in code]
    assert not calls, f"{path.name}: cells {calls} set torch threads unconditionally; use set_cpu_threads(model)"


MAINTAINER_NOTES = {
    "the seed document": re.compile(r"\bseed(?:'s| document)|multi_adapter_rl\.zh|shared/seeds", re.I),
    "a TODO": re.compile(r"\b(?:TODO|FIXME|XXX)\b"),
    "a commit hash": re.compile(r"\bcommit\s+[0-9a-f]{7,40}\b|\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*\d)[0-9a-f]{7,40}\b"),
    "a load average": re.compile(r"load average", re.I),
    "an issue number": re.compile(r"(?<![\w&/])#\d+\b|\bissues?\s+#?\d+\b|/issues/\d+|/pull/\d+", re.I),
}
"""What a learner cannot use: notes about documents they never see, unfinished work, the machine's load, our
tracker. Runtimes stay, said as "on a 2-core CPU"."""


def maintainer_notes(text: str) -> list[str]:
    return [f"{what}: {match.group(0)!r}" for what, pattern in MAINTAINER_NOTES.items()
            for match in pattern.finditer(text)]


def test_maintainer_note_detector():
    assert maintainer_notes("The seed's Quickstart, with marl_utils") == ["the seed document: \"seed's\""]
    assert maintainer_notes("# TODO(profiles.py): a field") == ["a TODO: 'TODO'"]
    assert maintainer_notes("code at commit 5f94069") == ["a commit hash: 'commit 5f94069'"]
    assert maintainer_notes("(load average 1.4 at the start)") == ["a load average: 'load average'"]
    assert maintainer_notes("in TRL (#769, closed)") == ["an issue number: '#769'"]
    assert maintainer_notes("see issue 6's checks") == ["an issue number: 'issue 6'"]
    clean = ("torch.manual_seed(0); the same seed gives the same samples; 2 min on a 2-core CPU; color '#1f77b4'; "
             "## 3. GAE; 0.26x of 742.1 MB; step 1234")
    assert maintainer_notes(clean) == []


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_no_maintainer_notes_in_learner_facing_cells(path):
    found = {i: notes for i, cell in enumerate(cells(path)) if (notes := maintainer_notes(source(cell)))}
    assert not found, f"{path.name}: cells with notes a learner cannot use (say it for the learner, or drop it): {found}"
