"""A TLS file that cannot be loaded is named as other config errors are: the config file, the
line of the setting and its key (`carehub.yaml:7: listeners.mllp[0].tls.cert: ...`), by
`routes check` and by a hub that is started on the config."""

from __future__ import annotations

import asyncio
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from carehub.cli import main
from carehub.config import load_config
from carehub.errors import ConfigError
from carehub.hub import Hub
from tests.test_tls import Certs, certs  # noqa: F401  (the certs fixture)


def write_tls_config(folder: Path, certs: Certs, **broken: str) -> Path:  # noqa: F811
    """A config whose MLLP listener takes TLS with the certs' files, but for those in
    ``broken`` (cert, key or client_ca), which name a file that is not there."""
    files = {"cert": certs.server_cert, "key": certs.server_key, "client_ca": certs.ca}
    files.update({key: folder / name for key, name in broken.items()})
    path = folder / "carehub.yaml"
    path.write_text(
        textwrap.dedent(
            f"""\
            listeners:
              mllp:
                - name: adt
                  host: 127.0.0.1
                  port: 0
                  tls:
                    cert: {files["cert"]}
                    key: {files["key"]}
                    client_ca: {files["client_ca"]}
              http: {{enabled: false}}
            routes: []
            """
        ),
        encoding="utf-8",
    )
    return path


def line_of(path: Path, key: str) -> int:
    lines = path.read_text(encoding="utf-8").splitlines()
    return next(n for n, line in enumerate(lines, start=1) if line.strip().startswith(f"{key}:"))


@pytest.mark.parametrize("broken", ["cert", "key", "client_ca"])
def test_routes_check_names_the_file_line_and_key_of_a_missing_tls_file(
    tmp_path: Path,
    certs: Certs,  # noqa: F811
    broken: str,
) -> None:
    config = write_tls_config(tmp_path, certs, **{broken: "missing.pem"})

    result = CliRunner().invoke(
        main,
        ["routes", "check", "--offline", "--config", str(config), "--data-dir", str(tmp_path)],
    )

    assert result.exit_code == 2, result.output
    where = f"{config}:{line_of(config, broken)}: listeners.mllp[0].tls.{broken}: cannot load"
    assert result.output.startswith(f"error: {where}"), result.output
    assert str(tmp_path / "missing.pem") in result.output


def test_a_hub_started_on_the_config_names_the_same_line(
    tmp_path: Path,
    certs: Certs,  # noqa: F811
) -> None:
    config = write_tls_config(tmp_path, certs, key="missing.pem")

    with pytest.raises(ConfigError) as raised:
        asyncio.run(Hub(load_config(config), tmp_path / "data").start())

    line = line_of(config, "key")
    assert str(raised.value).startswith(f"{config}:{line}: listeners.mllp[0].tls.key: cannot load")
