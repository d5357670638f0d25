"""Headless Neovim with clients/nvim attaches `longbow lsp`, which talks to a real gateway over a socket:
hover and an inline fill at a typed hole, in a Python file and a TypeScript file. Neovim writes what it
got to a JSON file; the test asserts on it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.rag.codectx.workspaces import MODELS, write_workspace

pytestmark = pytest.mark.slow

CLIENT = Path(__file__).resolve().parents[2] / "clients" / "nvim"

# Runs inside Neovim: every wait is vim.wait on a condition with a deadline.
SCRIPT = r"""
vim.opt.runtimepath:prepend(vim.env.LONGBOW_NVIM)
local longbow = require("longbow")
longbow.setup({ cmd = vim.fn.json_decode(vim.env.LONGBOW_CMD), address = vim.env.LONGBOW_ADDRESS })
local out = { }
local function finish()
  vim.fn.writefile({ vim.fn.json_encode(out) }, vim.env.LONGBOW_OUT)
  vim.cmd("qa!")
end
local ok, err = pcall(function()
  vim.cmd("edit " .. vim.env.LONGBOW_FILE)
  assert(vim.wait(30000, function() return #vim.lsp.buf_get_clients(0) > 0 end, 50), "no client attached")
  local client = vim.lsp.buf_get_clients(0)[next(vim.lsp.buf_get_clients(0))]
  assert(vim.wait(30000, function() return client.initialized end, 50), "client not initialized")
  vim.api.nvim_win_set_cursor(0, { tonumber(vim.env.LONGBOW_LINE), tonumber(vim.env.LONGBOW_COL) })
  local hover = vim.lsp.buf_request_sync(0, "textDocument/hover", vim.lsp.util.make_position_params(), 120000)
  for _, response in pairs(hover or {}) do
    out.hover = response.result and response.result.contents.value or vim.inspect(response.error)
  end
  local done = false
  longbow.inline(function(items, request_error)
    out.inline = vim.tbl_map(function(item) return item.insertText end, items)
    out.inline_error = request_error and vim.inspect(request_error) or nil
    done = true
  end)
  assert(vim.wait(120000, function() return done end, 50), "no inline answer")
  out.virtual_text = #vim.api.nvim_buf_get_extmarks(0, vim.api.nvim_create_namespace("longbow_inline"), 0, -1, {})
end)
if not ok then out.failure = tostring(err) end
finish()
"""


def run_nvim(gateway, tmp_path: Path, file: Path, line: int, column: int, max_tokens: int = 4) -> dict:
    nvim = shutil.which("nvim")
    assert nvim, "nvim not found: apt-get install -y neovim (scripts/system-deps.sh does)"
    (tmp_path / "test.lua").write_text(SCRIPT)
    out = tmp_path / "out.json"
    command = [sys.executable, "-m", "longbow.services.cli", "lsp", "--max-tokens", str(max_tokens), "--error-rounds", "0"]
    env = {"LONGBOW_NVIM": str(CLIENT), "LONGBOW_CMD": json.dumps(command), "LONGBOW_ADDRESS": gateway.address,
           "LONGBOW_FILE": str(file), "LONGBOW_LINE": str(line), "LONGBOW_COL": str(column), "LONGBOW_OUT": str(out),
           "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path / "config"), "XDG_DATA_HOME": str(tmp_path / "data"),
           "XDG_STATE_HOME": str(tmp_path / "state"), "PATH": "/usr/bin:/bin"}
    result = subprocess.run([nvim, "--headless", "--clean", "-c", f"luafile {tmp_path / 'test.lua'}"], env=env,
                            capture_output=True, text=True, timeout=300, cwd=file.parent)
    assert out.is_file(), f"nvim wrote nothing (rc {result.returncode}): {result.stderr[-2000:]}"
    found = json.loads(out.read_text())
    assert "failure" not in found, found
    # The editor quit: the language server closed its edit sessions, so the gateway holds no KV for it.
    assert gateway.wait_until_idle()["kv_blocks_used"] == 0
    return found


def test_python_hover_and_inline_fill(gateway, tmp_path):
    root = tmp_path / "project"
    hole = write_workspace(root, {"pyproject.toml": "", "app/models.py": MODELS, "app/use.py": """
        from app.models import User, Role
        def make(name: str) -> User: ...
        def f(name: str, role: Role) -> User:
            return <|>
        """})
    # Neovim's cursor column is a 0-based byte index: the hole's 1-based column - 1 (ASCII line).
    found = run_nvim(gateway, tmp_path, root / hole.path, hole.line, hole.column - 1)
    assert "**Expected type** `User`" in found["hover"] and "class User" in found["hover"]
    assert found["inline"] and found["inline"][0].strip(), found
    assert found["virtual_text"] == 1


def test_typescript_hover_and_inline_fill(gateway, tmp_path):
    root = tmp_path / "web"
    hole = write_workspace(root, {"package.json": "{}", "src/point.ts": "export interface Point { x: number; y: number }\n",
                                  "src/app.ts": """
        import { Point } from "./point";
        const label = "📍";
        const origin: Point = <|>;
        """})
    # The chat model opens a code fence first: 4 tokens are not enough to reach the code.
    found = run_nvim(gateway, tmp_path, root / hole.path, hole.line, hole.column - 1, max_tokens=16)
    assert "`Point`" in found["hover"] and "interface Point" in found["hover"]
    assert found["inline"] and found["inline"][0].strip(), found
