"""`carehub` commands run as real processes, on a project folder as a site writes one (a
carehub.yaml naming routes.yaml, its listeners on ports the system picks), in this process's
environment without CAREHUB_* (a shell's settings would change what the commands read)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

#: ``carehub`` as a command line.
CAREHUB = [sys.executable, "-m", "carehub.cli"]


def environment(**changes: str | None) -> dict[str, str]:
    """This process's environment without CAREHUB_*, with ``changes`` (None: unset)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAREHUB_")}
    for name, value in changes.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def carehub(
    *args: str, command: Sequence[str] = CAREHUB, **env: str | None
) -> subprocess.CompletedProcess[str]:
    """``carehub ARGS`` (``command``, when given, runs it under a wrapper) to its end, in
    :func:`environment` with ``env``."""
    return subprocess.run(
        [*command, *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=environment(**env),
    )


def routes_check(
    config: Path, data_dir: Path, **env: str | None
) -> subprocess.CompletedProcess[str]:
    """`carehub routes check --offline` on ``config``, in :func:`environment` with ``env``."""
    where = ["--config", str(config), "--data-dir", str(data_dir)]
    return carehub("routes", "check", "--offline", *where, **env)


def project(folder: Path, routes: str, settings: str = "") -> Path:
    """``folder`` made, holding ``routes`` as routes.yaml and the carehub.yaml returned, which
    names it, listens on MLLP and HTTP on ports the system picks and ends with ``settings``."""
    folder.mkdir(parents=True)
    (folder / "routes.yaml").write_text(routes, encoding="utf-8")
    config = folder / "carehub.yaml"
    config.write_text(
        "routes: [routes.yaml]\n"
        "listeners:\n"
        "  mllp: [{name: adt, host: 127.0.0.1, port: 0}]\n"
        "  http: {host: 127.0.0.1, port: 0}\n" + settings,
        encoding="utf-8",
    )
    return config


def unprivileged_port_start() -> int:
    """The lowest port any account may bind here: Linux's setting, else 1024 as on the BSDs;
    macOS and Windows reserve none."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text().strip())
    except (OSError, ValueError):
        return 0 if sys.platform in ("darwin", "win32") else 1024


def unprotected_lines(output: str) -> dict[str, str]:
    """Destination -> its line, for the lines of a log or `routes check` saying patient data
    leaves unprotected (in clear, or without checking the server)."""
    found: dict[str, str] = {}
    for line in output.splitlines():
        if "sends patient data to" not in line:
            continue
        match = re.search(r"\((?:forward|\S+, channel) \S+ (\S+), plugin", line)
        assert match, line
        assert match.group(1) not in found, f"two lines for {match.group(1)}"
        found[match.group(1)] = line
    return found
