"""`longbow lsp` runs where only `pip install longbow[lsp]` was: the server and the CLI path to it import
nothing server-side. A fresh interpreter refuses those imports, then starts the server on pipes and
answers initialize and shutdown."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.test_packaging import REFUSE_IMPORTS, SERVER_ONLY

RUN_WITHOUT_SERVER_PACKAGES = REFUSE_IMPORTS + """
from longbow.services.cli import main
sys.exit(main(["lsp", "--address", "127.0.0.1:1"]))
"""


def _frame(message: dict) -> bytes:
    body = json.dumps(message).encode()
    return f"Content-Length: {len(body)}\r\n\r\n".encode() + body


def test_lsp_starts_and_answers_without_server_packages():
    messages = [
        {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"processId": None, "rootUri": None,
                                                                       "capabilities": {}}},
        {"jsonrpc": "2.0", "id": 2, "method": "shutdown", "params": None},
        {"jsonrpc": "2.0", "method": "exit", "params": None},
    ]
    result = subprocess.run([sys.executable, "-c", RUN_WITHOUT_SERVER_PACKAGES, ",".join(SERVER_ONLY)],
                            input=b"".join(map(_frame, messages)), capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr.decode()
    assert b'"hoverProvider": true' in result.stdout and b'"inlineCompletionProvider"' in result.stdout
    assert b'"id": 2' in result.stdout  # shutdown answered
