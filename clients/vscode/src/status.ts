// The status-bar item showing the connection state to the gateway.
import * as vscode from "vscode";
import { ConnectionState, statusText } from "./settings";

export class ConnectionStatus implements vscode.Disposable {
  private readonly item: vscode.StatusBarItem;
  state: ConnectionState = "starting";

  constructor() {
    this.item = vscode.window.createStatusBarItem(vscode.StatusBarAlignment.Right, 100);
    this.item.command = "longbow.restart";
    this.show("starting");
    this.item.show();
  }

  show(state: ConnectionState, detail = ""): void {
    this.state = state;
    const { text, tooltip } = statusText(state, detail);
    this.item.text = text;
    this.item.tooltip = tooltip;
  }

  dispose(): void {
    this.item.dispose();
  }
}
