"""Fixtures for code-context tests."""

from __future__ import annotations

import pytest

from .workspaces import Hole, write_workspace


@pytest.fixture
def workspace(tmp_path):
    def make(files: dict[str, str]) -> Hole | None:
        return write_workspace(tmp_path, files)

    return make


@pytest.fixture(scope="session")
def disk_roots(tmp_path_factory) -> tuple[str, ...]:
    """Roots a service under test may read from disk: every tmp_path of this session. The service reads no
    disk by default; tests of indexing and checking on real files opt in, as an operator would."""
    return (str(tmp_path_factory.getbasetemp()),)
