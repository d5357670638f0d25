"""`longbow lsp`: a Language Server Protocol server over the Longbow SDK (no torch), shared by every editor.

The editor clients (clients/vscode, clients/nvim, eglot, Helix, Zed) only launch it. It maps LSP to the
CodeAssist and Sessions RPCs: hover -> expected and relevant types, completion -> relevant headers,
inline completion -> Complete (typed hole) or the document's edit session (PIE), didOpen/didChange ->
UpdateFiles and session edits. Modules: positions (LSP code units <-> code points), documents (the
editor's buffers and the edits a change makes), workspace_files (what the gateway is sent), gateway_link
(the one door to the gateway and its connection state), server (the LSP features).
"""
