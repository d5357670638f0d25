// Pure logic of the extension (no `vscode` import), unit-tested under Node's test runner:
// the command line that launches `longbow lsp` from the settings, and what the status bar says.

export interface LongbowSettings {
  path: string;
  address: string;
  token: string;
  tls: boolean;
  tlsCa: string;
  maxTokens: number;
  errorRounds: number;
}

export const DEFAULTS: LongbowSettings = {
  path: "longbow", address: "", token: "", tls: false, tlsCa: "", maxTokens: 32, errorRounds: 1,
};

/** `longbow lsp` with the flags the settings ask for; empty settings leave the server's own defaults. */
export function serverCommand(settings: Partial<LongbowSettings>): { command: string; args: string[] } {
  const s = { ...DEFAULTS, ...settings };
  const args = ["lsp"];
  if (s.address.trim()) args.push("--address", s.address.trim());
  if (s.token) args.push("--token", s.token);
  if (s.tls) args.push("--tls");
  if (s.tlsCa.trim()) args.push("--tls-ca", s.tlsCa.trim());
  args.push("--max-tokens", String(Math.max(1, Math.floor(s.maxTokens))));
  args.push("--error-rounds", String(Math.min(2, Math.max(0, Math.floor(s.errorRounds)))));
  return { command: s.path.trim() || "longbow", args };
}

export type ConnectionState = "starting" | "connected" | "disconnected" | "stopped";

/** The status bar's text and tooltip for a connection state (codicons in the text). */
export function statusText(state: ConnectionState, detail = ""): { text: string; tooltip: string } {
  const texts: Record<ConnectionState, string> = {
    starting: "$(sync~spin) Longbow",
    connected: "$(check) Longbow",
    disconnected: "$(warning) Longbow",
    stopped: "$(circle-slash) Longbow",
  };
  const tooltips: Record<ConnectionState, string> = {
    starting: "Longbow: starting the language server",
    connected: "Longbow: connected to the gateway",
    disconnected: "Longbow: the gateway is unreachable; retrying",
    stopped: "Longbow: the language server is not running",
  };
  return { text: texts[state], tooltip: detail ? `${tooltips[state]}\n${detail}` : tooltips[state] };
}

/** The server's `longbow/status` notification -> a state (anything malformed counts as disconnected). */
export function stateFromNotification(params: unknown): { state: ConnectionState; detail: string } {
  const value = (params ?? {}) as { connected?: unknown; message?: unknown };
  const detail = typeof value.message === "string" ? value.message : "";
  return { state: value.connected === true ? "connected" : "disconnected", detail };
}
