"""Artifacts are written atomically: an interrupted writer leaves the previous folder intact."""

import pytest

from marl_utils.infra.atomic import atomic_dir, atomic_write_json


def test_interrupted_write_keeps_previous_folder(tmp_path):
    final = tmp_path / "stage"
    with atomic_dir(final) as tmp:
        (tmp / "weights").write_text("v1")
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(final) as tmp:
            (tmp / "weights").write_text("half")
            raise KeyboardInterrupt
    assert (final / "weights").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stage"], "no temporary folder may be left behind"


def test_interrupted_first_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "stage"):
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_atomic_json_replaces_content(tmp_path):
    atomic_write_json(tmp_path / "a.json", {"x": 1})
    atomic_write_json(tmp_path / "a.json", {"x": 2})
    assert (tmp_path / "a.json").read_text().strip().endswith("}") and '"x": 2' in (tmp_path / "a.json").read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]
