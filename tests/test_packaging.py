"""The wheel as a site installs it: built from a clean tree, installed into a fresh venv, and
run there on the example configs it carries."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.sitekit import ROOT


def run(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=900, check=False, cwd=cwd
    )
    assert done.returncode == 0, f"{args}: {done.stdout[-2000:]}{done.stderr[-2000:]}"
    return done


@pytest.mark.timeout(1200)
def test_a_wheel_from_a_clean_tree_installs_and_checks_its_example_configs(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    run("git", "clone", "--quiet", "--depth", "1", f"file://{ROOT}", tree)  # committed files only
    run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", tmp_path / "dist", tree)
    (wheel,) = (tmp_path / "dist").glob("pocd-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    drivers = {p.name for p in (ROOT / "drivers").glob("*.toml")}
    assert drivers and {f"pocd/_drivers/{d}" for d in drivers} <= names
    assert {
        "pocd/_examples/site/pocd.toml",
        "pocd/_examples/protocols/cart-tct-3.1.toml",
        "pocd/_systemd/pocd.service",
        "pocd/_systemd/pocd.sysusers.conf",
        "pocd/_systemd/pocd.tmpfiles.conf",
    } <= names

    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv)
    run(venv / "bin" / "pip", "install", "--quiet", wheel)
    version = run(venv / "bin" / "pocd", "--version").stdout.strip()
    assert version.startswith("pocd ") and "unknown" not in version
    assert run(venv / "bin" / "python", "-m", "pocd", "--version").stdout.strip() == version

    # Away from the source tree, so that only the installed package can answer.
    package = run(
        venv / "bin" / "python",
        "-c",
        "import pocd, os; print(os.path.dirname(pocd.__file__))",
        cwd=tmp_path,
    ).stdout.strip()
    assert package.startswith(str(venv))
    example = Path(package) / "_examples" / "site" / "pocd.toml"
    checked = run(venv / "bin" / "pocd", "check", example, cwd=tmp_path)
    assert checked.stdout.strip() == f"{example}: ok"
