"""The set-up files agree with each other: pyproject pins == environment.yml pins; README's commands == CI."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _env_pip_requirements():
    lines = (ROOT / "environment.yml").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "- pip:")
    reqs = []
    for line in lines[start + 1:]:
        m = re.match(r"^\s+- (.+)$", line)
        if not m:
            break
        reqs.append(m.group(1).strip())
    return reqs


def test_environment_yml_pins_match_pyproject():
    project = _pyproject()["project"]
    expected = set(project["dependencies"]) | set(project["optional-dependencies"]["test"])
    env = {r for r in _env_pip_requirements() if not r.startswith("-e")}
    assert env == expected, f"only in environment.yml: {env - expected}; only in pyproject: {expected - env}"
    assert any(r.startswith("-e") and "[test]" in r for r in _env_pip_requirements())
    assert "python=3.11" in (ROOT / "environment.yml").read_text()


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    commands = re.findall(r"(python -m pytest [^`\n]*?)\s*(?:#|$)", readme, flags=re.M)
    assert commands, "README must show the test command"
    assert commands[0].strip() in [line.strip() for line in ci.splitlines()], (
        "the test command in .ci/run must be the README's, verbatim")
    setup = (ROOT / ".ci" / "setup").read_text()
    assert "bash .ci/setup" in ci and "bash .ci/setup" in readme
    assert setup.index("torch==2.13.0") < setup.index('-e ".[test]"'), "CPU torch must be installed first"


def test_console_script_and_module_entry_point():
    scripts = _pyproject()["project"]["scripts"]
    assert scripts["marl"] == "marl_utils.cli:main"
    assert (ROOT / "marl_utils" / "__main__.py").exists()
