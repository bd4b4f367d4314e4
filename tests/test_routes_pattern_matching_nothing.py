"""A `routes:` pattern of the hub config that matches no file is a config error naming the
key and the pattern (`routes check`, `serve`, a reload), not a hub that answers AA and routes
nothing; `routes: []` is how a config says it has no routes on purpose."""

from __future__ import annotations

from pathlib import Path

import pytest

from carehub.config import load_config
from carehub.errors import ConfigError
from carehub.testing import HubThread
from tests.test_worker import GOOD_ROUTE, cli, write_config


def with_routes(config_path: Path, routes: str) -> int:
    """Put ``routes`` in place of the config's `routes:` line; the line it is on."""
    lines = config_path.read_text(encoding="utf-8").splitlines()
    at = lines.index("routes: [routes.yaml]")
    lines[at] = routes
    config_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return at + 1


def test_routes_check_names_a_pattern_that_matches_no_file(tmp_path: Path) -> None:
    config_path = write_config(tmp_path, GOOD_ROUTE)
    line = with_routes(config_path, 'routes: [routes.yaml, "rutes/*.yaml"]')

    result = cli(config_path, tmp_path / "data", "routes", "check")

    assert result.exit_code == 2, result.output
    assert (
        f"{config_path}:{line}: routes[1]: 'rutes/*.yaml' matches no file in {tmp_path}; "
        "write `routes: []` for a hub with no routes"
    ) in result.output
    assert "ok:" not in result.output


def test_serve_does_not_start_on_a_pattern_that_matches_no_file(tmp_path: Path) -> None:
    config_path = write_config(tmp_path, GOOD_ROUTE)
    with_routes(config_path, 'routes: ["rutes/*.yaml"]')

    refused = r"routes\[0\]: 'rutes/\*\.yaml' matches no file"
    with pytest.raises(ConfigError, match=refused), HubThread(load_config(config_path), tmp_path):
        pass  # the hub does not start


def test_an_empty_routes_list_still_means_no_routes(tmp_path: Path) -> None:
    config_path = write_config(tmp_path, GOOD_ROUTE)
    with_routes(config_path, "routes: []")

    result = cli(config_path, tmp_path / "data", "routes", "check", "--offline")

    assert result.exit_code == 0, result.output
    assert "ok: 0 route(s)" in result.output
