"""The editor's open buffers as this server knows them, and the character edits each change makes.

A `didChange` carries ranges in LSP positions against the text before that change; an edit session on
the gateway wants code-point offsets into its current text. Applying the changes here, in order, turns
each into an `Edit(start, end, text)` over the previous text, so the session receives exactly the edits
the editor made. A whole-text replacement (a client that syncs full text) becomes the smallest edit that
makes the same text (common prefix and suffix kept), so it too is a small edit for PIE.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from longbow.services.client.sessions import Edit
from longbow.services.lsp.positions import line_starts, offset_of

LANGUAGES = {"python": "python", "typescript": "typescript", "typescriptreact": "typescript"}


@dataclass
class TextDocument:
    uri: str
    path: Path | None  # None for untitled buffers (no file on disk)
    language_id: str
    version: int
    text: str
    session_id: str | None = None  # the gateway's edit session on this text, if any
    session_epoch: int = -1  # the gateway connection the session belongs to (a restart loses sessions)
    session_tokens: int = 0  # tokens the session holds, as the gateway last reported
    last_used: float = 0.0  # monotonic time of the session's last prediction (the oldest is closed first)
    pending_edits: list[Edit] = field(default_factory=list)  # made here, not yet sent to the session

    @property
    def language(self) -> str:
        """"python" or "typescript" (what the gateway supports), else ""."""
        if self.language_id in LANGUAGES:
            return LANGUAGES[self.language_id]
        suffix = self.path.suffix if self.path else ""
        return {".py": "python", ".pyi": "python", ".ts": "typescript", ".tsx": "typescript"}.get(suffix, "")

    def apply(self, start: tuple[int, int] | None, end: tuple[int, int] | None, new_text: str,
              encoding: str) -> Edit:
        """Apply one content change (a range in LSP positions, or None for the whole text); returns the
        edit in code points over the text before it, and records it for the session."""
        if start is None or end is None:
            edit = minimal_edit(self.text, new_text)
        else:
            starts = line_starts(self.text)
            begin = offset_of(self.text, *start, encoding, starts)
            edit = Edit(begin, max(begin, offset_of(self.text, *end, encoding, starts)), new_text)
        self.text = self.text[:edit.start] + edit.text + self.text[edit.end:]
        if edit.start != edit.end or edit.text:
            self.pending_edits.append(edit)
        return edit


def minimal_edit(old: str, new: str) -> Edit:
    prefix = 0
    limit = min(len(old), len(new))
    while prefix < limit and old[prefix] == new[prefix]:
        prefix += 1
    suffix = 0
    while suffix < limit - prefix and old[len(old) - 1 - suffix] == new[len(new) - 1 - suffix]:
        suffix += 1
    return Edit(prefix, len(old) - suffix, new[prefix:len(new) - suffix])


def apply_edits(text: str, edits: list[Edit]) -> str:
    """The text after `edits`, each over the text the previous one left (what a session does)."""
    for edit in edits:
        text = text[:edit.start] + edit.text + text[edit.end:]
    return text
