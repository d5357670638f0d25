"""Typed-hole code context (Hazel/ChatLSP style) for Python and TypeScript: the expected type of a hole,
the type definitions it needs, functions whose types fit, packed into a token budget; and completions
checked by a type checker with error rounds. Entry points: `build_context` (one shot, the CLI) and
`CodeContextService` (long-lived, the gateway)."""

from longbow.rag.codectx.records import CodeContext, Completion, ContextItem, Diagnostic, ExpectedType
from longbow.rag.codectx.service import CodeContextService, HoleRequest, build_context

__all__ = ["CodeContext", "CodeContextService", "Completion", "ContextItem", "Diagnostic", "ExpectedType",
           "HoleRequest", "build_context"]
