"""The document store, source of truth for chunks, embeddings and the document index, plus a change log.

Two implementations behind one ABC and one test suite: `RedisStore` (deployments; several gateway replicas
share it) and `EmbeddedStore` (sqlite under a directory; `longbow serve` on one machine). Derived indexes
(FAISS, BM25; rag/index.py) are rebuilt from `document_ids()` + `document()` and kept current by reading
`changes_since(seq)`. A change only names a document: the reader re-reads that document's current state,
so replaying a change twice, or out of date, is harmless and replicas converge.

An acknowledged write must survive a crash. Redis keeps data in memory: `open_store` reads the server's
persistence settings and refuses (`NotDurableError`, naming the fix) unless the append-only file is on
with `appendfsync always` or `everysec`. NOTE: everysec writes the AOF before Redis answers, so a killed
Redis process loses nothing acknowledged; a host crash may lose up to the last second (use `always`
where that matters). Operators who accept losses opt out with `require_durable=False` (a warning).
"""

from __future__ import annotations

import abc
import json
import logging
import sqlite3
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from longbow.rag.types import Chunk

MAX_CHANGES = 100_000  # change-log entries kept; a reader further behind rebuilds (ChangeLogGap)
DURABLE_FSYNC = ("always", "everysec")

log = logging.getLogger(__name__)


class NotDurableError(Exception):
    """The store would acknowledge writes that a crash can lose (or cannot tell); the message names the fix."""


@dataclass(frozen=True)
class StoredDocument:
    """A document as stored: its chunks and their embeddings (row i embeds chunks[i])."""

    document_id: str
    content_hash: str
    chunks: list[Chunk]
    embeddings: np.ndarray  # [len(chunks), D] float32
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Change:
    seq: int  # 1, 2, 3, ... without holes, in commit order
    document_id: str
    kind: str  # "put" | "delete"


class ChangeLogGap(Exception):
    """Entries after the reader's seq were trimmed (or the store was reset): rebuild from scratch."""


class Store(abc.ABC):
    """Contract: `put` and `delete` are atomic and durable when they return (ingestion is acknowledged
    after them); each one that changes something appends exactly one Change; `put` of a document whose
    stored content_hash equals the new one changes nothing and returns False."""

    @abc.abstractmethod
    def document_hash(self, document_id: str) -> str | None: ...

    @abc.abstractmethod
    def put(self, document: StoredDocument) -> bool:
        """Store or replace a document; False when the same content hash was already stored."""

    @abc.abstractmethod
    def delete(self, document_id: str) -> bool:
        """Remove a document and its chunks; False when it did not exist."""

    @abc.abstractmethod
    def document(self, document_id: str) -> StoredDocument | None: ...

    @abc.abstractmethod
    def document_ids(self) -> list[str]: ...

    @abc.abstractmethod
    def last_seq(self) -> int:
        """Seq of the newest change (0 when none)."""

    @abc.abstractmethod
    def changes_since(self, seq: int, limit: int = 1000) -> list[Change]:
        """Changes with seq > `seq`, oldest first, at most `limit`. Raises ChangeLogGap when some are gone."""

    def close(self) -> None:
        pass


def encode_chunks(chunks: list[Chunk]) -> str:
    return json.dumps([[c.chunk_id, c.text, c.char_start, c.char_end, c.metadata] for c in chunks])


def decode_chunks(document_id: str, payload: str | bytes) -> list[Chunk]:
    return [Chunk(cid, document_id, text, start, end, meta) for cid, text, start, end, meta in json.loads(payload)]


def decode_embeddings(payload: bytes, rows: int) -> np.ndarray:
    vectors = np.frombuffer(payload, dtype=np.float32)
    return vectors.reshape(rows, -1) if rows else np.zeros((0, 0), np.float32)


def _check_gap(seq: int, newest: int, changes: list[Change]) -> None:
    if newest < seq or (newest > seq and (not changes or changes[0].seq != seq + 1)):
        raise ChangeLogGap(f"changes after seq {seq} are no longer in the log (newest {newest})")


class EmbeddedStore(Store):
    """sqlite (WAL) in `directory`/store.sqlite3. Several processes may open the same directory."""

    def __init__(self, directory: str | Path, max_changes: int = MAX_CHANGES):
        Path(directory).mkdir(parents=True, exist_ok=True)
        self.path, self.max_changes = Path(directory) / "store.sqlite3", max_changes
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=30, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # acknowledged means on disk
        self._db.executescript(
            "CREATE TABLE IF NOT EXISTS documents (document_id TEXT PRIMARY KEY, content_hash TEXT NOT NULL,"
            " metadata TEXT NOT NULL, chunks TEXT NOT NULL, rows INTEGER NOT NULL, embeddings BLOB NOT NULL);"
            "CREATE TABLE IF NOT EXISTS changes (seq INTEGER PRIMARY KEY AUTOINCREMENT, document_id TEXT NOT NULL,"
            " kind TEXT NOT NULL);")

    def _write(self, document_id: str, kind: str, statement: str, args: tuple) -> None:
        self._db.execute(statement, args)
        seq = self._db.execute("INSERT INTO changes (document_id, kind) VALUES (?, ?)", (document_id, kind)).lastrowid
        self._db.execute("DELETE FROM changes WHERE seq <= ?", (seq - self.max_changes,))

    def document_hash(self, document_id: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT content_hash FROM documents WHERE document_id = ?", (document_id,)).fetchone()
        return row[0] if row else None

    def put(self, document: StoredDocument) -> bool:
        args = (document.document_id, document.content_hash, json.dumps(document.metadata),
                encode_chunks(document.chunks), len(document.chunks),
                np.ascontiguousarray(document.embeddings, np.float32).tobytes())
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute("SELECT content_hash FROM documents WHERE document_id = ?",
                                       (document.document_id,)).fetchone()
                if row and row[0] == document.content_hash:
                    self._db.execute("ROLLBACK")
                    return False
                self._write(document.document_id, "put", "INSERT OR REPLACE INTO documents VALUES (?, ?, ?, ?, ?, ?)", args)
                self._db.execute("COMMIT")
                return True
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def delete(self, document_id: str) -> bool:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                exists = self._db.execute("SELECT 1 FROM documents WHERE document_id = ?", (document_id,)).fetchone()
                if exists:
                    self._write(document_id, "delete", "DELETE FROM documents WHERE document_id = ?", (document_id,))
                self._db.execute("COMMIT")
                return bool(exists)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def document(self, document_id: str) -> StoredDocument | None:
        with self._lock:
            row = self._db.execute("SELECT content_hash, metadata, chunks, rows, embeddings FROM documents "
                                   "WHERE document_id = ?", (document_id,)).fetchone()
        if row is None:
            return None
        content_hash, metadata, chunks, rows, embeddings = row
        return StoredDocument(document_id, content_hash, decode_chunks(document_id, chunks),
                              decode_embeddings(embeddings, rows), json.loads(metadata))

    def document_ids(self) -> list[str]:
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT document_id FROM documents ORDER BY document_id")]

    def last_seq(self) -> int:
        with self._lock:
            return self._last_seq()

    def _last_seq(self) -> int:
        # sqlite_sequence keeps the AUTOINCREMENT high-water mark even after old rows are trimmed.
        row = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'changes'").fetchone()
        return row[0] if row else 0

    def changes_since(self, seq: int, limit: int = 1000) -> list[Change]:
        with self._lock:
            self._db.execute("BEGIN")  # one snapshot for the rows and the high-water mark
            try:
                rows = self._db.execute("SELECT seq, document_id, kind FROM changes WHERE seq > ? ORDER BY seq "
                                        "LIMIT ?", (seq, limit)).fetchall()
                newest = self._last_seq()
            finally:
                self._db.execute("COMMIT")
        changes = [Change(*row) for row in rows]
        _check_gap(seq, newest, changes)
        return changes

    def close(self) -> None:
        with self._lock:
            self._db.close()


# Atomic put: compare the stored hash, replace the document, append a change with seq = INCR(seq).
# KEYS: document hash key, document-id set, seq counter, change stream.
# ARGV: document id, content hash, metadata json, chunks json, rows, embeddings bytes, max stream length.
_PUT = """
if redis.call('HGET', KEYS[1], 'content_hash') == ARGV[2] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'content_hash', ARGV[2], 'metadata', ARGV[3], 'chunks', ARGV[4], 'rows', ARGV[5],
           'embeddings', ARGV[6])
redis.call('SADD', KEYS[2], ARGV[1])
local seq = redis.call('INCR', KEYS[3])
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[7], seq .. '-0', 'document_id', ARGV[1], 'kind', 'put')
return seq
"""
_DELETE = """
if redis.call('DEL', KEYS[1]) == 0 then return 0 end
redis.call('SREM', KEYS[2], ARGV[1])
local seq = redis.call('INCR', KEYS[3])
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[2], seq .. '-0', 'document_id', ARGV[1], 'kind', 'delete')
return seq
"""


class RedisStore(Store):
    """Redis: one hash per document (chunks json + embeddings bytes), a set of document ids, a seq counter
    and a stream of changes whose entry ids are `<seq>-0`. Writes are Lua scripts, so atomic."""

    def __init__(self, url: str, prefix: str = "longbow:rag", max_changes: int = MAX_CHANGES):
        import redis

        self.redis = redis.Redis.from_url(url)
        self.prefix, self.max_changes = prefix, max_changes
        self._put, self._delete = self.redis.register_script(_PUT), self.redis.register_script(_DELETE)
        self._keys = [f"{prefix}:documents", f"{prefix}:seq", f"{prefix}:changes"]

    def check_durable(self, required: bool = True) -> None:
        """Reads the server's persistence settings (connecting: redis' ConnectionError when it is down).
        Raises NotDurableError when acknowledgements would not survive a crash and `required`; logs a
        warning instead when not required."""
        import redis

        try:
            settings = {**self.redis.config_get("appendonly"), **self.redis.config_get("appendfsync")}
            problem = durability_problem(settings)
        except redis.exceptions.ResponseError as error:  # CONFIG renamed or disabled (managed Redis)
            problem = f"cannot read its persistence settings ({error})"
        if problem is None:
            return
        fix = ("run Redis with `--appendonly yes` (appendfsync everysec or always; `CONFIG SET appendonly yes` "
               "on a running server, then persist it in redis.conf)")
        if required:
            raise NotDurableError(f"Redis store {self.url_for_logs}: {problem}, so acknowledged documents can be "
                                  f"lost in a crash. Fix: {fix}; or accept the risk with "
                                  "`rag.require_durable = false` (LONGBOW_STORE_REQUIRE_DURABLE=0).")
        log.warning("Redis store %s: %s; acknowledged documents can be lost in a crash "
                    "(rag.require_durable = false)", self.url_for_logs, problem)

    @property
    def url_for_logs(self) -> str:
        kwargs = self.redis.connection_pool.connection_kwargs
        return f"{kwargs.get('host', kwargs.get('path', '?'))}:{kwargs.get('port', '')}/{kwargs.get('db', 0)}"

    def _document_key(self, document_id: str) -> str:
        return f"{self.prefix}:doc:{document_id}"

    def document_hash(self, document_id: str) -> str | None:
        value = self.redis.hget(self._document_key(document_id), "content_hash")
        return value.decode() if value is not None else None

    def put(self, document: StoredDocument) -> bool:
        args = [document.document_id, document.content_hash, json.dumps(document.metadata),
                encode_chunks(document.chunks), len(document.chunks),
                np.ascontiguousarray(document.embeddings, np.float32).tobytes(), self.max_changes]
        return bool(self._put(keys=[self._document_key(document.document_id), *self._keys], args=args))

    def delete(self, document_id: str) -> bool:
        keys = [self._document_key(document_id), *self._keys]
        return bool(self._delete(keys=keys, args=[document_id, self.max_changes]))

    def document(self, document_id: str) -> StoredDocument | None:
        fields = self.redis.hgetall(self._document_key(document_id))
        if not fields:
            return None
        rows = int(fields[b"rows"])
        return StoredDocument(document_id, fields[b"content_hash"].decode(),
                              decode_chunks(document_id, fields[b"chunks"]),
                              decode_embeddings(fields[b"embeddings"], rows), json.loads(fields[b"metadata"]))

    def document_ids(self) -> list[str]:
        return sorted(m.decode() for m in self.redis.smembers(self._keys[0]))

    def last_seq(self) -> int:
        return int(self.redis.get(self._keys[1]) or 0)

    def changes_since(self, seq: int, limit: int = 1000) -> list[Change]:
        pipe = self.redis.pipeline(transaction=True)  # one snapshot for the entries and the counter
        pipe.xrange(self._keys[2], min=f"{seq}-1", max="+", count=limit)
        pipe.get(self._keys[1])
        entries, newest = pipe.execute()
        changes = [Change(int(entry_id.split(b"-")[0]), fields[b"document_id"].decode(), fields[b"kind"].decode())
                   for entry_id, fields in entries]
        _check_gap(seq, int(newest or 0), changes)
        return changes

    def close(self) -> None:
        self.redis.close()


def durability_problem(settings: dict) -> str | None:
    """Why Redis with these CONFIG values would lose acknowledged writes in a crash; None if it would not."""
    if settings.get("appendonly") != "yes":
        return "its append-only file is off (appendonly no)"
    if settings.get("appendfsync") not in DURABLE_FSYNC:
        return f"appendfsync is {settings.get('appendfsync')!r}, not always or everysec"
    return None


def open_store(store_url: str = "", data_dir: str | Path = "", require_durable: bool = True) -> Store:
    """RedisStore for a redis:// (or rediss://, unix://) URL, else the EmbeddedStore under data_dir.
    A Redis store is checked for durability first (connecting: redis' ConnectionError when it is down)."""
    if store_url:
        if not store_url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"unsupported store URL {store_url!r}: expected redis://host:port/db")
        store = RedisStore(store_url)
        try:
            store.check_durable(require_durable)
        except BaseException:
            store.close()
            raise
        return store
    if not data_dir:
        raise ValueError("the embedded store needs a data directory")
    return EmbeddedStore(data_dir)
