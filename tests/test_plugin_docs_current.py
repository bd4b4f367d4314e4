"""What a plugin author reads matches carehub: each hook page says the release the hook
appeared in (and a newer hook how to implement it optionally), the pager template requires the
carehub it needs, its README counts and names every hook, its install steps run as written,
and the reserved forward keys are the ones carehub refuses."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

from carehub import __version__, hookspecs
from carehub.plugins import RESERVED_OPTION_KEYS
from tests.conftest import SAMPLE_DESTINATIONS
from tests.helpers_cli import environment
from tests.test_hook_docs import HOOKS

ROOT = Path(__file__).resolve().parents[1]
PAGER = ROOT / "plugins" / "carehub-pager"
NUMBERS = {3: "three", 4: "four", 5: "five", 9: "nine", 10: "ten", 11: "eleven", 12: "twelve"}


def test_every_hook_has_the_release_it_appeared_in() -> None:
    versions = getattr(hookspecs, "HOOK_VERSIONS", {})
    assert sorted(versions) == HOOKS
    plugins_md = (ROOT / "docs" / "plugins.md").read_text(encoding="utf-8")
    for hook, version in versions.items():
        page = (ROOT / "docs" / "hooks" / f"{hook}.md").read_text(encoding="utf-8")
        assert f"*Since carehub {version}*" in page, hook
        if version != "0.1.0":  # newer than the first release: say how to stay compatible
            assert "@hookimpl(optionalhook=True)" in page, hook
            assert f"| `{hook}` | {version} |" in plugins_md, hook
    assert "@hookimpl(optionalhook=True)" in plugins_md


def test_the_pager_requires_the_carehub_it_uses() -> None:
    project = tomllib.loads((PAGER / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    (carehub,) = [r for r in map(Requirement, project["dependencies"]) if r.name == "carehub"]
    # 0.1.0 and 0.2.0 lack carehub.builtins.http_channel.unprotected_http, which it imports.
    assert not carehub.specifier.contains("0.1.0")
    assert not carehub.specifier.contains("0.2.0")
    assert carehub.specifier.contains(__version__)


def test_the_pager_readme_counts_and_names_every_hook() -> None:
    readme = (PAGER / "README.md").read_text(encoding="utf-8")
    uses = re.search(r"This one uses\s+(\w+) of the (\w+):", readme)
    assert uses, "the README should say how many of the hooks the pager uses"
    assert uses.group(2) == NUMBERS[len(HOOKS)]
    for hook in HOOKS:
        assert f"`{hook}`" in readme, hook


def test_the_reserved_forward_keys_are_the_ones_carehub_refuses() -> None:
    page = (ROOT / "docs" / "hooks" / "carehub_register_channels.md").read_text(encoding="utf-8")
    intro = page.split("## ", 1)[0]
    for key in RESERVED_OPTION_KEYS["channel"]:
        assert f"`{key}`" in intro, key
    assert f"those {NUMBERS.get(len(RESERVED_OPTION_KEYS['channel']), '?')} names" in intro


def test_the_pager_readme_install_steps_run_as_written(tmp_path: Path) -> None:
    readme = (PAGER / "README.md").read_text(encoding="utf-8")
    install = readme.split("## Install", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```sh\n(.*?)```", install, flags=re.DOTALL)
    lines = [line for line in block.splitlines() if not line.startswith("pip install")]
    script = "set -e\n" + "\n".join(lines)
    ran = subprocess.run(
        ["bash", "-c", script],
        cwd=ROOT,  # "from a carehub checkout"
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        # `carehub` as installed beside this Python: the environment the README installs into.
        # Nothing else the suite sets: a reader's shell has none of it.
        env=environment(
            PATH=os.pathsep.join([str(Path(sys.executable).parent), os.defpath]),
            **dict.fromkeys([*SAMPLE_DESTINATIONS, "CARE_PLATFORM_SECRET", "PAGER_URL"]),
        ),
    )
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "pager 0.1.0 (entry point)" in ran.stdout
    assert "ok: 1 route(s), 1 destination(s)" in ran.stdout
    assert '"text":"carehub: admission - unit WARD - msg ' in ran.stdout
