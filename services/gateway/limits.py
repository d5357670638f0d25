"""What one request may cost the gateway before a handler runs: the largest message it receives.

NOTE: grpc's receive limit is global (no per-peer limit exists), so it is sized to the largest *valid*
request rather than left at 64 MB: a prompt of `max_prompt_chars` or a document of `max_document_chars`
at 4 bytes per character (UTF-8's worst case) plus 1 MiB for the other fields. Unauthenticated bodies
are never parsed (errors.py); this bounds what gRPC buffers for them.
"""

from __future__ import annotations

from longbow.services.config import LongbowConfig

HEADROOM_BYTES = 1 << 20
UTF8_MAX_BYTES_PER_CHAR = 4


def receive_limit_bytes(config: LongbowConfig) -> int:
    if config.gateway.max_receive_bytes:
        return config.gateway.max_receive_bytes
    largest = max(config.gateway.max_prompt_chars, config.rag.max_document_chars, config.code.max_file_bytes)
    return UTF8_MAX_BYTES_PER_CHAR * largest + HEADROOM_BYTES
