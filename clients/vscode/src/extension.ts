// Longbow for VS Code: launches `longbow lsp` (stdio) through vscode-languageclient. Hover, completion and
// inline completion (LSP 3.18, wired by the language client) all come from that one server; this file
// only starts it, shows the connection state, and offers two commands.
import * as vscode from "vscode";
import { LanguageClient, LanguageClientOptions, ServerOptions, State } from "vscode-languageclient/node";
import { LongbowSettings, serverCommand, stateFromNotification } from "./settings";
import { ConnectionStatus } from "./status";

let client: LanguageClient | undefined;
let status: ConnectionStatus | undefined;

function readSettings(): Partial<LongbowSettings> {
  const config = vscode.workspace.getConfiguration("longbow");
  return {
    path: config.get<string>("path"), address: config.get<string>("address"), token: config.get<string>("token"),
    tls: config.get<boolean>("tls"), tlsCa: config.get<string>("tlsCa"), maxTokens: config.get<number>("maxTokens"),
    errorRounds: config.get<number>("errorRounds"),
  };
}

async function start(context: vscode.ExtensionContext): Promise<void> {
  const { command, args } = serverCommand(readSettings());
  const server: ServerOptions = { command, args };
  const options: LanguageClientOptions = {
    documentSelector: ["python", "typescript", "typescriptreact"].flatMap((language) => [
      { scheme: "file", language }, { scheme: "untitled", language }]),
    outputChannelName: "Longbow",
  };
  client = new LanguageClient("longbow", "Longbow", server, options);
  context.subscriptions.push(client.onDidChangeState((event) => {
    if (event.newState === State.Stopped) status?.show("stopped");
    if (event.newState === State.Running) status?.show("connected");
  }));
  context.subscriptions.push(client.onNotification("longbow/status", (params) => {
    const { state, detail } = stateFromNotification(params);
    status?.show(state, detail);
  }));
  status?.show("starting");
  try {
    await client.start();
  } catch (error) {
    status?.show("stopped", String(error));
    void vscode.window.showErrorMessage(`Longbow: could not start \`${command} ${args.join(" ")}\`: ${error}`);
  }
}

async function showContext(): Promise<void> {
  const editor = vscode.window.activeTextEditor;
  if (!client || !editor) return;
  const position = client.code2ProtocolConverter.asPosition(editor.selection.active);
  const found = await client.sendRequest("longbow/context", {
    textDocument: { uri: editor.document.uri.toString() }, position });
  const document = await vscode.workspace.openTextDocument({ language: "json", content: JSON.stringify(found, null, 2) });
  await vscode.window.showTextDocument(document, { preview: true, viewColumn: vscode.ViewColumn.Beside });
}

export async function activate(context: vscode.ExtensionContext): Promise<void> {
  status = new ConnectionStatus();
  context.subscriptions.push(status);
  context.subscriptions.push(vscode.commands.registerCommand("longbow.restart", async () => {
    await client?.stop();
    await start(context);
  }));
  context.subscriptions.push(vscode.commands.registerCommand("longbow.showContext", showContext));
  context.subscriptions.push(vscode.workspace.onDidChangeConfiguration(async (event) => {
    if (event.affectsConfiguration("longbow")) {
      await client?.stop();
      await start(context);
    }
  }));
  await start(context);
}

export async function deactivate(): Promise<void> {
  await client?.stop();
}
