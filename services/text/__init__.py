"""Text over the token-id engine: chat templates, incremental detokenization and stop strings (text.py),
character edits as token-span replacements (edits.py), PIE edit sessions (sessions.py), and the `LM`
adapters RAG uses (lm.py). The engine below knows token ids only; everything that knows text is here."""
