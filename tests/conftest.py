"""Shared fixtures: a running hub on free local ports with a fresh SQLite store per test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from carehub.testing import HubThread, local_config

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CORPUS = PROJECT_ROOT.parent / "shared" / "corpus" / "fhir-converter-hl7v2"


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[HubThread]:
    """A hub with one MLLP listener and the HTTP listener, both on 127.0.0.1."""
    with HubThread(local_config(), tmp_path / "data") as running:
        yield running


def corpus_files() -> list[Path]:
    return sorted(CORPUS.glob("*.hl7")) if CORPUS.is_dir() else []


requires_corpus = pytest.mark.skipif(
    not CORPUS.is_dir(),
    reason=f"sample corpus not found at {CORPUS} (it sits beside the checkout in shared/corpus)",
)
