"""carehub's pytest plugin (the ``pytest11`` entry point ``carehub``): the ``carehub_routes``
fixture for route tests in a project's own suite.

    def test_discharge_goes_to_the_care_platform(carehub_routes):
        result = carehub_routes("tests/messages/discharge.hl7")
        assert result.matched[0].route == "admissions-discharges"
        assert result.deliveries[0].destination == "admissions-discharges/care-platform"

    def test_every_message_of_the_batch_is_routed(carehub_routes):
        results = carehub_routes.all("tests/messages/batch.hl7")   # one result per message
        assert all(result.matched for result in results)

A string holding a segment separator or ``|`` is message text; any other string, like a
``Path``, is a file path relative to the rootdir. The config comes from ``--carehub-config``, the
``carehub_config`` ini option, or config/carehub.yaml in the rootdir.

``carehub_plugins`` (ini) or ``--carehub-plugins`` (comma-separated plugin names) keeps the
session to those plugins, as ``CAREHUB_PLUGINS`` does: every helper and fixture, and every
``carehub`` process the tests start, then loads the built-ins and those plugins only, so
another vendor's package installed in the same environment cannot change a plugin's test
results. pytest loads this module
in every run of any environment carehub is installed in, so it imports nothing of carehub
until the fixture is used: the hub, its store and web stack take most of a second to import.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from carehub.routing.dryrun import DryRunResult


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("carehub")
    group.addoption("--carehub-config", default=None, help="carehub config for carehub_routes")
    parser.addini("carehub_config", "carehub config file for the carehub_routes fixture")
    group.addoption(
        "--carehub-plugins",
        default=None,
        metavar="NAMES",
        help="load only these carehub plugins (comma-separated) besides the built-ins",
    )
    parser.addini(
        "carehub_plugins",
        "carehub plugins (comma-separated) the session loads besides the built-ins, as "
        "CAREHUB_PLUGINS; others installed are left out",
    )


#: The environment variable the plugin host reads its allow-list from (carehub.plugins
#: ENV_ALLOW; not imported, so that pytest runs without carehub's import cost).
ENV_ALLOW = "CAREHUB_PLUGINS"
#: CAREHUB_PLUGINS as it was before the session set it: None when it was not set.
_ALLOW_BEFORE = "_carehub_plugins_before"


def pytest_configure(config: pytest.Config) -> None:
    """Set CAREHUB_PLUGINS for the session from --carehub-plugins or the carehub_plugins ini
    option: the plugin host reads it at every load, in this process and in the ``carehub``
    processes tests start, which inherit it."""
    names = config.getoption("--carehub-plugins") or config.getini("carehub_plugins")
    if not names:
        return
    allow = ",".join(n.strip() for n in str(names).replace("\n", ",").split(",") if n.strip())
    setattr(config, _ALLOW_BEFORE, os.environ.get(ENV_ALLOW))
    os.environ[ENV_ALLOW] = allow


def pytest_unconfigure(config: pytest.Config) -> None:
    """Give CAREHUB_PLUGINS back its value from before the session."""
    if not hasattr(config, _ALLOW_BEFORE):
        return
    before = getattr(config, _ALLOW_BEFORE)
    if before is None:
        os.environ.pop(ENV_ALLOW, None)
    else:
        os.environ[ENV_ALLOW] = before


class RouteRunner:
    """What ``carehub_routes`` gives a test: call it with one message, or ``.all`` with a file
    or text holding several (or an FHS/BHS batch) for one result per message."""

    def __init__(self, config: Path, rootpath: Path, data_dir: Path) -> None:
        self.config = config
        self.rootpath = rootpath
        self.data_dir = data_dir

    def __call__(self, message: str | bytes | Path) -> DryRunResult:
        """Dry-run one message (text, bytes, or a file path relative to the rootdir); a file
        holding several messages is an error that points at ``.all``."""
        from carehub.testing import run_routes

        return run_routes(self._source(message), self.config, self.data_dir)

    def all(self, messages: str | bytes | Path) -> list[DryRunResult]:
        """Dry-run every message of a file, text or bytes, in order."""
        from carehub.testing import run_routes_all

        return run_routes_all(self._source(messages), self.config, self.data_dir)

    def _source(self, message: str | bytes | Path) -> str | bytes | Path:
        """A file path, given as a str or a Path, read from the rootdir as the fixture says:
        the directory pytest was started from must not change which file a test reads. A
        missing file is an error naming the path looked at."""
        from carehub.testing import is_message_text

        if isinstance(message, bytes) or (isinstance(message, str) and is_message_text(message)):
            return message
        path = Path(message)
        looked_at = path if path.is_absolute() else self.rootpath / path
        if not looked_at.exists():
            why = [] if path.is_absolute() else ["a relative path is read from the rootdir"]
            if isinstance(message, str):
                why.append(
                    "a string is read as a file path unless it holds a segment separator or "
                    "'|', which makes it message text"
                )
            reason = f" ({'; '.join(why)})" if why else ""
            raise FileNotFoundError(f"{looked_at}: no such file{reason}")
        return looked_at


@pytest.fixture
def carehub_routes(request: pytest.FixtureRequest, tmp_path: Path) -> RouteRunner:
    """Dry-runs messages (text, bytes, or a file path relative to the rootdir) through the
    project's carehub routes: ``carehub_routes(one)`` or ``carehub_routes.all(several)``."""
    rootpath = Path(request.config.rootpath)
    option = request.config.getoption("--carehub-config") or request.config.getini("carehub_config")
    config_path = Path(option) if option else rootpath / "config" / "carehub.yaml"
    if not config_path.is_absolute():
        config_path = rootpath / config_path
    return RouteRunner(config_path, rootpath, tmp_path / "carehub-data")


__all__ = [
    "RouteRunner",
    "carehub_routes",
    "pytest_addoption",
    "pytest_configure",
    "pytest_unconfigure",
]
