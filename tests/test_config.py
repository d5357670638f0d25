"""Configuration precedence: defaults < TOML file < LONGBOW_* environment < explicit overrides."""

from __future__ import annotations

import os

import pytest

from longbow.services.config import load_config


def test_precedence_and_sections(tmp_path, monkeypatch):
    toml = tmp_path / "longbow.toml"
    toml.write_text("[engine]\ntoken_budget = 256\nnum_blocks = 100\n[sessions]\nidle_timeout_s = 30.0\n"
                    "[rag]\nstore_url = \"redis://file\"\n")
    monkeypatch.setenv("LONGBOW_NUM_BLOCKS", "200")
    monkeypatch.setenv("LONGBOW_CODE_ROOTS", os.pathsep.join(["/srv/a", "", "/srv/b"]))
    config = load_config(toml, engine__num_blocks=300, rag__store_url="redis://override")
    assert config.engine.token_budget == 256  # file
    assert config.engine.num_blocks == 300  # override beats env beats file
    assert config.sessions.idle_timeout_s == 30.0
    assert config.rag.store_url == "redis://override"
    assert config.code.allowed_roots == ["/srv/a", "/srv/b"]


def test_unknown_keys_are_refused(tmp_path):
    with pytest.raises(ValueError, match="sessions.nope"):
        load_config(None, sessions__nope=1)
