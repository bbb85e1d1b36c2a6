"""Composing bags (``histomil bags make``) cleans up after a killed compose and refuses a second
compose into the same folder at the same time (issue 12, items 3 and 5)."""

from __future__ import annotations

from pathlib import Path

import filelock
from typer.testing import CliRunner

from histomil.cli import app
from histomil.resources import example_tile_table

SMALL = ["--bag-size", "4", "--train-bags", "4", "--val-bags", "2", "--test-bags", "2", "--test-witnesses", "1", "--train-witnesses", "2", "--val-witnesses", "2"]


def bags_make(out: Path):
    return CliRunner().invoke(app, ["bags", "make", str(example_tile_table()), str(out), *SMALL])


def test_a_killed_compose_leaves_nothing_behind_after_the_next_one(tmp_path: Path):
    out = tmp_path / "study"
    killed = [tmp_path / ".study.ab12cd34.tmp", tmp_path / ".study.k9_j8h7g.old"]
    users = [tmp_path / ".study.tmp", tmp_path / ".other.ab12cd34.tmp", tmp_path / "study.ab12cd34.tmp"]
    for d in killed + users:
        d.mkdir()
        (d / "0").mkdir()  # a half-written bag folder
    result = bags_make(out)
    assert result.exit_code == 0, result.output
    assert not any(d.exists() for d in killed)
    assert all(d.exists() for d in users)  # only the compose's own temporary names are touched
    assert (out / "study.json").is_file()


def test_a_second_compose_into_one_folder_is_refused_and_keeps_the_first_ones_work(tmp_path: Path):
    out = tmp_path / "study"
    live = tmp_path / ".study.ab12cd34.tmp"  # the temporary folder of a compose that is running now
    live.mkdir()
    with filelock.FileLock(tmp_path / ".study.compose.lock", timeout=0):
        result = bags_make(out)
    assert result.exit_code == 2
    assert "another histomil process is composing bags here" in result.output and str(out) in result.output
    assert live.is_dir() and not out.exists()
