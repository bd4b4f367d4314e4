"""`carehub plugins --options NAME` for a component whose plugin failed to load says so, as
route binding does: the component is not unknown, its plugin is broken."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.test_cli import env_without_carehub


def test_options_of_a_component_whose_plugin_failed_name_the_plugin(tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "broken.py").write_text("import not_installed_sdk\n", encoding="utf-8")
    env = {**env_without_carehub(), "CAREHUB_PLUGINS_DIR": str(plugins)}
    done = subprocess.run(
        [sys.executable, "-m", "carehub.cli", "plugins", "--options", "half-ch"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode != 0
    assert "no component named 'half-ch'" in done.stderr
    assert "failed to load: broken" in done.stderr, done.stderr
