"""The CLI's retrieval and code-context commands, embedded (no server), on real files."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from longbow.services.cli import main


@pytest.fixture
def rag_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("LONGBOW_RAG_DIR", str(tmp_path / "rag"))
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "zorblat.md").write_text("# Zorblat\n\nZorblat is a city on the river Quen. Mira Tal founded it in 1820.\n")
    (docs / "bells.txt").write_text("Glass bells are rung at dawn in the harbour of Vessa.\n")
    return docs


def test_ingest_then_query_embedded(rag_dir, capsys):
    assert main(["ingest", str(rag_dir), "--chunker", "sentence"]) == 0
    assert "2/2 documents" in capsys.readouterr().err
    assert main(["ingest", str(rag_dir), "--chunker", "sentence"]) == 0
    assert "2 unchanged" in capsys.readouterr().err  # idempotent
    assert main(["query", "Who founded Zorblat?", "--top-k", "1", "--chunks"]) == 0
    assert "zorblat.md:0-" in capsys.readouterr().out


def test_query_output_json_store_dir_and_no_noise(rag_dir, tmp_path, capsys):
    """Results on stdout (grouped by document by default), --json, --store-dir; nothing on stderr; and a
    retrieval-only query never imports torch (its import alone took ~3 s of the 5.9 s per call before)."""
    store_dir = tmp_path / "elsewhere"
    assert main(["ingest", str(rag_dir), "--chunker", "sentence"]) == 0
    capsys.readouterr()
    argv = ["query", "Who founded Zorblat?", "--top-k", "2", "--json",
            "--store-dir", str(rag_dir.parent / "rag")]
    script = ("import sys; from longbow.services.cli import main; "
              f"code = main({argv!r}); "
              "assert 'torch' not in sys.modules, 'torch imported'; "
              "assert 'sentence_transformers' not in sys.modules, 'sentence_transformers imported'; "
              "sys.exit(code)")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "LONGBOW_RAG_DIR": str(store_dir)})
    assert run.returncode == 0 and run.stderr == "", run.stderr
    result = json.loads(run.stdout)
    assert result["query"] == "Who founded Zorblat?" and len(result["documents"]) == 2
    best = result["documents"][0]
    assert best["document_id"].endswith("zorblat.md")
    assert best["citations"][0]["document_id"] == best["document_id"]
    assert "Mira Tal" in " ".join(c["text"] for c in best["citations"])
    assert main(["query", "Who founded Zorblat?", "--store-dir", str(store_dir)]) == 2
    assert "no such directory" in capsys.readouterr().err
    store_dir.mkdir()
    assert main(["query", "Who founded Zorblat?", "--store-dir", str(store_dir)]) == 0  # an empty store
    assert capsys.readouterr().out == ""


def test_ingest_errors_are_reported(rag_dir, tmp_path, capsys):
    assert main(["ingest", str(tmp_path / "missing")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_context_command(tmp_path, capsys):
    (tmp_path / "shapes.py").write_text(
        "from dataclasses import dataclass\n\n\n@dataclass\nclass Box:\n    side: float\n\n\n"
        "def unit() -> Box:\n    return \n")
    assert main(["context", f"{tmp_path / 'shapes.py'}:10:12", "--root", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert "expected type: Box" in captured.err and "class Box" in captured.out
    assert main(["context", f"{tmp_path / 'shapes.py'}:99:1", "--root", str(tmp_path)]) == 2
    assert main(["context", "/etc/hostname:1:1", "--root", str(tmp_path)]) == 2
