"""Edit sessions: a document's KV kept alive in the engine across edits (PIE), predictions at a cursor.

Text in, text out (like text.py): character edits become token-span replacements (edits.py), which
become KV updates (pie.py). Everything runs on the engine thread. What runs the model (open, fork,
apply_edits, reencode, predict) is a KV job (`*_job`, engine/jobs.py) whose passes ride in the engine's
steps beside requests, so an 8k-token open never stalls other streams for more than a step at a time; the
gateway runs them with `AsyncLLMEngine.run_job` keyed by session id (one session's calls in order), the
plain methods run them to their end (`LLMEngine.run_job`). A session with a job in flight is busy: never
expired or evicted, and a close releases its KV when the job ends. Sessions share the engine's KV blocks
with requests. Idle sessions expire and free their KV; a drift budget (tokens changed since the last full
encode) marks a session for a re-encode, which the caller runs after answering (the gateway queues it
behind the reply).

Budgets (issue 16): tokens per session (`max_document_tokens`), sessions per client and in all, an idle
timeout a client cannot raise past `max_idle_timeout_s`, and the KV all sessions hold together
(`max_kv_fraction` of the cache; requests always keep the rest). Sessions untouched for
`evict_idle_after_s` are evicted least-recently-used when KV is needed: by a new or growing session over the
budget, or by a request the engine cannot admit (the manager is the scheduler's `kv_reclaimer`). The next
call on an evicted session is UnknownRequestError (NOT_FOUND) saying so; sessions in use keep their KV, and
a request that cannot fit beside them fails at once with CapacityError (engine.py).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from longbow.services.config import SessionsConfig
from longbow.services.text.edits import TokenizedText, apply_edit
from longbow.services.engine.engine import LLMEngine
from longbow.services.engine.errors import CapacityError, InvalidRequestError, PromptTooLongError, UnknownRequestError
from longbow.services.engine.jobs import Job
from longbow.services.engine.pie import DocumentKV, UpdateMode
from longbow.services.engine.scheduler import blocks_for

log = logging.getLogger(__name__)

MAX_PREDICT_TOKENS = 256
LINE_TOKENS = 64  # a "rest of the line" prediction stops here if no newline came
REMEMBERED_ENDINGS = 4096  # why recently closed sessions ended, for the NOT_FOUND of their next call
EVICTED = "evicted to free KV"


@dataclass(frozen=True)
class TextEdit:
    """Replace characters [start, end) of the current text with `text` (insert: start == end)."""

    start: int
    end: int
    text: str


@dataclass
class EditOutcome:
    tokens: int
    tokens_encoded: int  # tokens run through the model by these edits (the rest were re-positioned)
    seconds: float
    reencode_due: bool  # the drift budget is spent: call reencode() soon


@dataclass
class Session:
    session_id: str
    client: str
    document: TokenizedText
    kv: DocumentKV
    idle_timeout_s: float
    last_used: float
    mode: UpdateMode = UpdateMode.PIE
    changed_since_encode: int = 0
    edits_since_encode: int = 0
    busy: int = 0  # KV jobs in flight on this session: not evicted or expired; a close waits for them
    closed: bool = False  # closed while busy: the last job to end releases the KV


def replica_of(session_id: str) -> str | None:
    """The replica id a session id was minted with ("<replica>/s3-..."), None for an id without one."""
    replica, slash, _ = session_id.rpartition("/")
    return replica if slash else None


class SessionManager:
    def __init__(self, engine: LLMEngine, tokenizer, config: SessionsConfig | None = None,
                 clock: Callable[[], float] = time.monotonic, id_prefix: str = ""):
        self.engine, self.tokenizer = engine, tokenizer
        # The gateway passes its replica id: a session id names the replica holding its KV ("<replica>/s3-...").
        self.id_prefix = id_prefix
        self.config, self.clock = config or SessionsConfig(), clock
        self.sessions: dict[str, Session] = {}
        self.reencodes = 0
        self._ids = itertools.count()
        self.eos = set(engine.loaded.args.eos_token_ids)
        self._vocabulary: dict[str, list[tuple[int, str]]] | None = None  # first character -> (id, text)
        self.evictions = 0
        self._endings: OrderedDict[str, str] = OrderedDict()  # session id -> why it ended (bounded)
        self._opening: dict[int, tuple[DocumentKV, int]] = {}  # documents being encoded -> blocks reserved
        # NOTE: one reclaimer per engine: the latest manager built on an engine answers its KV requests.
        engine.scheduler.kv_reclaimer = self.reclaim

    # ---- lifecycle -----------------------------------------------------------------------------
    def open(self, text: str, client: str = "", idle_timeout_s: float = 0.0,
             mode: UpdateMode = UpdateMode.PIE) -> Session:
        return self.engine.run_job(self.open_job(text, client, idle_timeout_s, mode))

    def open_job(self, text: str, client: str = "", idle_timeout_s: float = 0.0,
                 mode: UpdateMode = UpdateMode.PIE) -> Job:
        self.expire()
        self._check_limits(client)
        document = TokenizedText.of(self.tokenizer, text)
        self._check_size(len(document.token_ids))
        needed = self._blocks_for(len(document.token_ids))
        self._make_room(needed)
        kv = DocumentKV.for_engine(self.engine)
        self._opening[id(kv)] = (kv, needed)  # counted against the budget while it encodes
        try:
            yield from kv.encode_job(list(document.token_ids))
        except BaseException:
            kv.release()
            raise
        finally:
            del self._opening[id(kv)]
        session_id = self._new_id()
        # A client may ask for a shorter or longer idle timeout, never past the server's cap.
        timeout = min(idle_timeout_s or self.config.idle_timeout_s, self.config.max_idle_timeout_s)
        session = Session(session_id, client, document, kv, timeout, self.clock(), mode)
        self.sessions[session_id] = session
        log.debug("session %s opened: %d tokens", session_id, len(document.token_ids))
        return session

    def fork(self, session_id: str, mode: UpdateMode | None = None) -> Session:
        return self.engine.run_job(self.fork_job(session_id, mode))

    def fork_job(self, session_id: str, mode: UpdateMode | None = None) -> Job:
        """A new session with a copy of this one's text and KV (no model pass), e.g. to try an edit
        speculatively or to compare update modes on the same starting point."""
        source = self._get(session_id)
        self._check_limits(source.client)
        self._make_room(len(source.kv.blocks), keep=source)
        with self._busy(source):
            kv = yield from source.kv.fork_job()
        if source.closed:  # closed while its KV was being copied: the copy goes too
            kv.release()
            raise UnknownRequestError(f"session {session_id!r} was closed while it was being forked")
        session_id = self._new_id()
        session = Session(session_id, source.client, source.document, kv, source.idle_timeout_s, self.clock(),
                          mode or source.mode, source.changed_since_encode, source.edits_since_encode)
        self.sessions[session_id] = session
        return session

    def close(self, session_id: str, reason: str = "closed") -> None:
        session = self.sessions.pop(session_id, None)
        if session is None:
            raise UnknownRequestError(f"unknown session {session_id!r} (closed or expired)")
        if session.busy:
            session.closed = True  # the job in flight still writes its slots; it releases them when it ends
        else:
            session.kv.release()
        self._endings[session_id] = reason
        while len(self._endings) > REMEMBERED_ENDINGS:
            self._endings.popitem(last=False)

    def expire(self) -> list[str]:
        """Close sessions idle longer than their timeout; returns their ids."""
        now = self.clock()
        gone = [s.session_id for s in self.sessions.values() if not s.busy and now - s.last_used > s.idle_timeout_s]
        for session_id in gone:
            self.close(session_id, f"expired after {self.sessions[session_id].idle_timeout_s:g} s idle")
        return gone

    def reclaim(self, wanted_blocks: int, keep: Session | None = None) -> int:
        """Evict idle sessions (untouched for `evict_idle_after_s`), least recently used first, until
        `wanted_blocks` are freed or none is left; returns the blocks freed. The scheduler's kv_reclaimer:
        runs on the engine thread and only releases blocks."""
        now, freed = self.clock(), 0
        idle = [s for s in self.sessions.values()
                if s is not keep and not s.busy and now - s.last_used >= self.config.evict_idle_after_s]
        for session in sorted(idle, key=lambda s: s.last_used):
            if freed >= wanted_blocks:
                break
            freed += len(session.kv.blocks)
            self.close(session.session_id, EVICTED)
            self.evictions += 1
            log.info("session %s evicted to free KV (%d blocks wanted)", session.session_id, wanted_blocks)
        return freed

    @property
    def kv_blocks_held(self) -> int:
        """Blocks of open sessions plus those reserved by documents still being encoded."""
        opening = sum(max(reserved, len(kv.blocks)) for kv, reserved in self._opening.values())
        return sum(len(s.kv.blocks) for s in self.sessions.values()) + opening

    @property
    def kv_budget_blocks(self) -> int:
        return int(self.config.max_kv_fraction * self.engine.scheduler.pool.num_blocks)

    def close_all(self) -> None:
        for session_id in list(self.sessions):
            self.close(session_id)

    # ---- edits and predictions -----------------------------------------------------------------
    def apply_edits(self, session_id: str, edits: list[TextEdit]) -> EditOutcome:
        return self.engine.run_job(self.apply_edits_job(session_id, edits))

    def apply_edits_job(self, session_id: str, edits: list[TextEdit]) -> Job:
        """Apply edits in order, each against the text left by the previous one. All or nothing for
        validation: a bad edit anywhere is refused before any KV changes."""
        session = self._get(session_id)
        planned = self._plan(session.document, edits)
        if planned:
            growth = self._blocks_for(len(planned[-1].after.token_ids)) - len(session.kv.blocks)
            self._make_room(growth, keep=session)
        began, encoded = time.perf_counter(), 0
        try:
            with self._busy(session):
                for edit in planned:
                    stats = yield from session.kv.replace_job(edit.start, edit.end, list(edit.new_ids), session.mode)
                    encoded += stats.tokens_encoded
                    session.changed_since_encode += len(edit.new_ids) + (edit.end - edit.start)
                    session.edits_since_encode += 1
        except CapacityError:
            # The KV filled up halfway through an update: what is cached no longer matches any text.
            self.close(session_id, "closed: the KV cache filled up during an edit")
            raise CapacityError("KV cache is full: the edits could not be applied and the session was "
                                "closed (its KV freed); open it again later") from None
        if session.closed:
            raise UnknownRequestError(f"session {session_id!r} was closed while its edits were applied")
        session.document = planned[-1].after if planned else session.document
        # NOTE: the estimate above ignores the slots an edit leaves free inside the document's blocks; trim
        # other idle sessions if the document grew past it (best effort: it has its KV already).
        self._make_room(0, keep=session, strict=False)
        due = session.mode == UpdateMode.PIE and session.changed_since_encode > self.config.drift_budget_tokens
        return EditOutcome(len(session.document.token_ids), encoded, time.perf_counter() - began, due)

    def reencode(self, session_id: str) -> bool:
        return self.engine.run_job(self.reencode_job(session_id))

    def reencode_job(self, session_id: str) -> Job:
        """Full re-encode of a session whose drift budget is spent (exact KV again). False when the
        session is gone or no longer due (closed, or re-encoded already)."""
        session = self.sessions.get(session_id)
        if session is None or session.changed_since_encode <= self.config.drift_budget_tokens:
            return False
        with self._busy(session):
            yield from session.kv.encode_job(list(session.document.token_ids))
        session.changed_since_encode = session.edits_since_encode = 0
        self.reencodes += 1
        return True

    def predict(self, session_id: str, cursor: int, max_tokens: int = 0) -> str:
        return self.engine.run_job(self.predict_job(session_id, cursor, max_tokens))

    def predict_job(self, session_id: str, cursor: int, max_tokens: int = 0) -> Job:
        """Greedy continuation of the text before `cursor`. max_tokens 0: up to the end of the line.

        NOTE: token healing. A cursor at a line start cuts "\n" from the indentation it is normally
        merged with ("\n        "), a boundary the model almost never saw: SmolLM2 then predicted a comment
        line ("#   ...") on nearly every stdlib sample. So the last token before the cursor (and any partial
        token) is taken back and the first new token must start with that text."""
        session = self._get(session_id)
        document = session.document
        if not 0 <= cursor <= len(document.text):
            raise InvalidRequestError(f"cursor {cursor} is outside the text (0..{len(document.text)})")
        if max_tokens > MAX_PREDICT_TOKENS:
            raise InvalidRequestError(f"max_tokens must be at most {MAX_PREDICT_TOKENS}")
        prefix = document.tokens_before(cursor)
        head = document.text[document.spans[prefix - 1][0]: cursor] if prefix >= 2 else ""
        allowed = self._tokens_starting_with(head) if head else []
        extra: list[int] = []
        if allowed:
            prefix -= 1
        else:
            head = ""
            partial = document.text[document.spans[prefix][0]: cursor] if prefix < len(document.spans) else ""
            extra = list(self.tokenizer(partial, add_special_tokens=False).input_ids) if partial else []
        self._check_size(prefix + len(extra) + (max_tokens or LINE_TOKENS))
        until_newline = (lambda ids: "\n" in self._decode(ids)[len(head):]) if max_tokens == 0 else None
        with self._busy(session):
            ids = yield from session.kv.predict_job(prefix, extra, max_tokens or LINE_TOKENS, self.eos,
                                                    until_newline, allowed or None)
        text = self._decode(ids)
        text = text[len(head):] if text.startswith(head) else text
        return text.split("\n", 1)[0] if max_tokens == 0 else text

    def _tokens_starting_with(self, head: str) -> list[int]:
        """Ids of every (non-special) token whose text starts with `head`."""
        if self._vocabulary is None:
            special = set(self.tokenizer.all_special_ids)
            self._vocabulary = {}
            pieces = self.tokenizer.batch_decode([[i] for i in range(len(self.tokenizer))])  # one Rust call
            for token_id, piece in enumerate(pieces):
                if piece and token_id not in special:
                    self._vocabulary.setdefault(piece[0], []).append((token_id, piece))
        return [i for i, piece in self._vocabulary.get(head[0], []) if piece.startswith(head)]

    def text(self, session_id: str) -> str:
        return self._get(session_id).document.text

    # ---- internals -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def _busy(self, session: Session):
        """A KV job in flight on the session; a close during it takes effect (KV freed) at its end."""
        session.busy += 1
        try:
            yield
        finally:
            session.busy -= 1
            if session.closed and not session.busy:
                session.kv.release()

    def _new_id(self) -> str:
        local = f"s{next(self._ids)}-{secrets.token_hex(6)}"
        return f"{self.id_prefix}/{local}" if self.id_prefix else local

    def _get(self, session_id: str) -> Session:
        session = self.sessions.get(session_id)
        if session is None:
            ending = self._endings.get(session_id)
            if ending is not None:
                raise UnknownRequestError(f"session {session_id!r} was {ending}; open it again")
            raise UnknownRequestError(f"unknown session {session_id!r} (closed or expired)")
        session.last_used = self.clock()
        return session

    def _plan(self, document: TokenizedText, edits: list[TextEdit]):
        planned = []
        for edit in edits:
            step = apply_edit(self.tokenizer, document, edit.start, edit.end, edit.text)
            planned.append(step)
            document = step.after
        self._check_size(len(document.token_ids))
        return planned

    def _check_limits(self, client: str) -> None:
        if len(self.sessions) + len(self._opening) >= self.config.max_sessions:
            raise CapacityError(f"too many open sessions ({self.config.max_sessions})")
        mine = sum(1 for s in self.sessions.values() if s.client == client)
        if mine >= self.config.max_sessions_per_client:
            raise CapacityError(f"this client has {mine} open sessions (limit {self.config.max_sessions_per_client})")

    def _check_size(self, tokens: int) -> None:
        budget_tokens = self.kv_budget_blocks * self.engine.config.engine.block_size
        limit = min(self.config.max_document_tokens, self.engine.max_model_len, budget_tokens)
        if tokens > limit:
            raise PromptTooLongError(f"document of {tokens} tokens exceeds the session limit of {limit}")

    def _blocks_for(self, tokens: int) -> int:
        return blocks_for(tokens, self.engine.config.engine.block_size)

    def _make_room(self, more_blocks: int, keep: Session | None = None, strict: bool = True) -> None:
        """Keep all sessions' KV within the budget with `more_blocks` added: evict idle sessions (LRU),
        else CapacityError (strict) naming the budget."""
        over = self.kv_blocks_held + more_blocks - self.kv_budget_blocks
        if over > 0:
            self.reclaim(over, keep)
        held = self.kv_blocks_held
        if strict and held + more_blocks > self.kv_budget_blocks:
            raise CapacityError(
                f"edit sessions hold {held} of their {self.kv_budget_blocks} blocks (sessions.max_kv_fraction"
                f" = {self.config.max_kv_fraction:g} of the cache), all in use; {more_blocks} more needed, "
                f"retry later")

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)
