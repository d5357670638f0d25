"""Fixtures for code-context tests."""

from __future__ import annotations

import pytest

from .workspaces import Hole, write_workspace


@pytest.fixture
def workspace(tmp_path):
    def make(files: dict[str, str]) -> Hole | None:
        return write_workspace(tmp_path, files)

    return make
