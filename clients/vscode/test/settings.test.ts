// Unit tests of the extension's pure logic and its status bar, with a stubbed `vscode` module (no VS Code
// binary here: its test harness downloads one at run time).
import { test } from "node:test";
import * as assert from "node:assert/strict";
import Module = require("node:module");
import { serverCommand, stateFromNotification, statusText } from "../src/settings";

test("empty settings launch plain `longbow lsp` with the default fill settings", () => {
  assert.deepEqual(serverCommand({}), {
    command: "longbow", args: ["lsp", "--max-tokens", "32", "--error-rounds", "1"] });
});

test("settings become flags, trimmed and clamped", () => {
  const { command, args } = serverCommand({
    path: " /venv/bin/longbow ", address: " gpu-box:50051 ", token: "s3cret", tls: true, tlsCa: "/ca.pem",
    maxTokens: 7.9, errorRounds: 5 });
  assert.equal(command, "/venv/bin/longbow");
  assert.deepEqual(args, ["lsp", "--address", "gpu-box:50051", "--token", "s3cret", "--tls", "--tls-ca", "/ca.pem",
    "--max-tokens", "7", "--error-rounds", "2"]);
});

test("status notifications map to states; malformed ones count as disconnected", () => {
  assert.deepEqual(stateFromNotification({ connected: true, message: "back" }), { state: "connected", detail: "back" });
  assert.deepEqual(stateFromNotification({ connected: false }), { state: "disconnected", detail: "" });
  assert.deepEqual(stateFromNotification(null), { state: "disconnected", detail: "" });
  assert.match(statusText("disconnected", "down").tooltip, /unreachable; retrying\ndown$/);
});

test("the status bar item follows the connection state (stubbed vscode)", () => {
  const items: Array<Record<string, unknown>> = [];
  const vscodeStub = {
    StatusBarAlignment: { Left: 1, Right: 2 },
    window: {
      createStatusBarItem: (alignment: number, priority: number) => {
        const item = { alignment, priority, shown: false, disposed: false, text: "", tooltip: "", command: "",
          show() { item.shown = true; }, dispose() { item.disposed = true; } };
        items.push(item);
        return item;
      },
    },
  };
  const resolve = (Module as any)._resolveFilename;
  (Module as any)._resolveFilename = function (request: string, ...rest: unknown[]) {
    return request === "vscode" ? "vscode" : resolve.call(this, request, ...rest);
  };
  require.cache["vscode"] = { id: "vscode", filename: "vscode", loaded: true, exports: vscodeStub } as any;
  try {
    const { ConnectionStatus } = require("../src/status");
    const status = new ConnectionStatus();
    assert.equal(items.length, 1);
    assert.equal(items[0].shown, true);
    assert.equal(items[0].command, "longbow.restart");
    assert.equal(items[0].text, "$(sync~spin) Longbow");
    status.show("disconnected", "gateway at 127.0.0.1:50051 is unreachable");
    assert.equal(items[0].text, "$(warning) Longbow");
    assert.match(String(items[0].tooltip), /127\.0\.0\.1:50051/);
    status.dispose();
    assert.equal(items[0].disposed, true);
  } finally {
    (Module as any)._resolveFilename = resolve;
    delete require.cache["vscode"];
  }
});
