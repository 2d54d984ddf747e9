"""The README's two commands on a fresh machine: `make run` and `make test` create the environment first when it
is missing or older than pyproject.toml / the Makefile (the stamp `make setup` writes), and skip that step when it
is up to date. Checked with `make -n` (prints the recipes, runs nothing) against a scratch VENV."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def planned(target: str, venv: Path) -> str:
    """The commands `make TARGET` would run with VENV=venv."""
    done = subprocess.run(["make", "-n", target, f"VENV={venv}"], cwd=ROOT, capture_output=True, text=True, check=True)
    return done.stdout


@pytest.mark.parametrize(("target", "then"), [("test", "/bin/pytest"), ("run", "/bin/fvrt-run")])
def test_a_missing_environment_is_created_first(tmp_path: Path, target: str, then: str) -> None:
    venv = tmp_path / "venv"
    plan = planned(target, venv)
    assert plan.index(f"-m venv {venv}") < plan.index(f"{venv}{then}"), plan
    assert f"touch {venv}/.setup-stamp" in plan  # written last: a failed setup leaves no stamp


@pytest.mark.parametrize(("target", "then"), [("test", "/bin/pytest"), ("run", "/bin/fvrt-run")])
def test_an_up_to_date_environment_is_not_installed_again(tmp_path: Path, target: str, then: str) -> None:
    venv = tmp_path / "venv"
    venv.mkdir()
    (venv / ".setup-stamp").touch()  # newer than pyproject.toml and the Makefile
    plan = planned(target, venv)
    assert "-m venv" not in plan and "pip install" not in plan and f"{venv}{then}" in plan, plan


def test_a_changed_pyproject_installs_again(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    venv.mkdir()
    stamp = venv / ".setup-stamp"
    stamp.touch()
    older = (ROOT / "pyproject.toml").stat().st_mtime - 60
    os.utime(stamp, (older, older))
    assert f"-m venv {venv}" in planned("test", venv)
