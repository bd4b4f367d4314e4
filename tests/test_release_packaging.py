"""What a site that installs carehub from a built wheel, and runs it as a service account,
relies on: the wheel carries the sample config (so `carehub demo` works without a checkout),
the license and the typing marker, under a version of its own; `routes check`, which an
admin may run as root before an upgrade, creates no folder serve would then not own; and a
file forward whose folder the service cannot write is refused at start, naming it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

import carehub
from carehub.cli import main

ROOT = Path(__file__).resolve().parents[1]
ROUTES = """\
routes:
  - name: archive
    steps:
      - forward: {{channel: file, directory: {directory}}}
"""


def _config(tmp_path: Path, directory: str) -> Path:
    (tmp_path / "routes.yaml").write_text(ROUTES.format(directory=directory), encoding="utf-8")
    config = tmp_path / "carehub.yaml"
    config.write_text("routes: [routes.yaml]\n", encoding="utf-8")
    return config


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", str(ROOT), "-w", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if built.returncode != 0:
        if "Could not find a version" in built.stderr or "No matching distribution" in built.stderr:
            pytest.skip(f"building a wheel needs setuptools from PyPI: {built.stderr[-300:]}")
        raise AssertionError(built.stderr)
    [found] = out.glob("carehub-*.whl")
    return found


def test_the_wheel_carries_samples_license_and_typing_marker_under_its_version(
    wheel: Path,
) -> None:
    assert wheel.name == f"carehub-{carehub.__version__}-py3-none-any.whl"
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "carehub/py.typed" in names
    assert f"carehub-{carehub.__version__}.dist-info/licenses/LICENSE" in names
    samples = {
        n.removeprefix("carehub/samples/") for n in names if n.startswith("carehub/samples/")
    }
    shipped = {
        str(p.relative_to(ROOT / "config")) for p in (ROOT / "config").rglob("*") if p.is_file()
    }
    assert shipped and shipped <= samples


def test_demo_finds_the_samples_of_an_installed_wheel_outside_any_checkout(
    wheel: Path, tmp_path: Path
) -> None:
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    found = subprocess.run(
        [sys.executable, "-c", "from carehub.demo import find_sample_config as f; print(f())"],
        cwd=elsewhere,
        env={**os.environ, "PYTHONPATH": str(site)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert found.returncode == 0, found.stderr
    assert Path(found.stdout.strip()) == site / "carehub" / "samples" / "carehub.yaml"


def test_routes_check_creates_neither_the_data_dir_nor_a_file_forwards_folder(
    tmp_path: Path,
) -> None:
    config = _config(tmp_path, "../outbox/archive")
    data_dir = tmp_path / "data"
    result = CliRunner().invoke(
        main, ["routes", "check", "--offline", "--config", str(config), "--data-dir", str(data_dir)]
    )
    assert result.exit_code == 0, result.output
    assert not data_dir.exists()
    assert not (tmp_path.parent / "outbox").exists()


def test_a_file_forward_under_a_file_is_refused_at_check_and_at_start(tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("not a folder", encoding="utf-8")
    config = _config(tmp_path, "taken/archive")
    check = CliRunner().invoke(main, ["routes", "check", "--offline", "--config", str(config)])
    assert check.exit_code != 0
    assert f"{tmp_path / 'taken'} is not a folder" in check.output


@pytest.mark.skipif(
    os.name != "posix" or os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="runs the check as another user: needs root and util-linux's setpriv",
)
def test_a_folder_the_service_user_cannot_write_is_refused_naming_it() -> None:
    # Outside pytest's own temporary folders, which only root may enter.
    with tempfile.TemporaryDirectory(prefix="carehub-service-") as folder:
        _refused_as_nobody(Path(folder))


def _refused_as_nobody(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    out = tmp_path / "outbox"
    out.mkdir()
    out.chmod(0o755)  # root's, as `routes check` run as root used to leave it
    config = _config(tmp_path, "outbox")
    for readable in (config, tmp_path / "routes.yaml"):  # whatever the umask
        readable.chmod(0o644)
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    carehub_cli = [sys.executable, "-m", "carehub.cli"]
    result = subprocess.run(
        [*nobody, *carehub_cli, "routes", "check", "--offline", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd="/",
        env={**os.environ, "HOME": "/"},
    )
    assert result.returncode != 0
    assert f"cannot write files in {out}" in result.stdout + result.stderr
