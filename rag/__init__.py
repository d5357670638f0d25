"""Longbow's retrieval front end and code context. Talks to a model only through `rag.lm.LM`; never
imports Ray or gRPC (DESIGN.md, boundaries)."""
