"""One suite, two stores: the EmbeddedStore (sqlite) and the RedisStore against a real redis-server."""

from __future__ import annotations

import itertools
import uuid

import numpy as np
import pytest

from longbow.rag.store import ChangeLogGap, EmbeddedStore, RedisStore, StoredDocument, open_store
from longbow.rag.types import Chunk


@pytest.fixture(params=["embedded", "redis"])
def make_store(request, tmp_path):
    """A factory: each call opens another handle on the same fresh store (as another process would)."""
    opened = []
    if request.param == "embedded":
        def make(**kwargs):
            opened.append(EmbeddedStore(tmp_path / "rag", **kwargs))
            return opened[-1]
    else:
        url, prefix = request.getfixturevalue("redis_server"), f"test-{uuid.uuid4().hex[:8]}"

        def make(**kwargs):
            opened.append(RedisStore(url, prefix=prefix, **kwargs))
            return opened[-1]
    yield make
    for store in opened:
        store.close()


def stored(document_id: str, text: str, content_hash: str, pieces: int = 3, seed: int = 0) -> StoredDocument:
    step = max(1, len(text) // pieces)
    cuts = [*range(0, len(text), step)][:pieces] + [len(text)]
    chunks = [Chunk(f"{document_id}#{content_hash[:8]}:{i}", document_id, text[a:b], a, b, {"lang": "en"})
              for i, (a, b) in enumerate(itertools.pairwise(cuts))]
    vectors = np.random.default_rng(seed).standard_normal((len(chunks), 8)).astype(np.float32)
    return StoredDocument(document_id, content_hash, chunks, vectors, {"lang": "en"})


def test_put_read_back_exactly(make_store):
    store = make_store()
    document = stored("docs/a.txt", "Ünïcode text — with a tail.\n", "h1")
    assert store.put(document)
    back = store.document("docs/a.txt")
    assert back.chunks == document.chunks and back.content_hash == "h1" and back.metadata == {"lang": "en"}
    np.testing.assert_array_equal(back.embeddings, document.embeddings)
    assert store.document_hash("docs/a.txt") == "h1" and store.document_ids() == ["docs/a.txt"]
    assert store.document("missing") is None and store.document_hash("missing") is None


def test_same_content_is_a_no_op_and_changed_content_replaces(make_store):
    store = make_store()
    assert store.put(stored("a", "first version of a", "h1"))
    assert not store.put(stored("a", "first version of a", "h1"))
    assert store.last_seq() == 1
    assert store.put(stored("a", "second, longer version of document a", "h2", pieces=5))
    back = store.document("a")
    assert back.content_hash == "h2" and len(back.chunks) == 5 and back.embeddings.shape == (5, 8)
    assert [c.kind for c in store.changes_since(0)] == ["put", "put"]


def test_delete_by_document_id(make_store):
    store = make_store()
    store.put(stored("a", "alpha text", "h1"))
    store.put(stored("b", "beta text", "h2"))
    assert store.delete("a") and not store.delete("a") and not store.delete("never")
    assert store.document_ids() == ["b"] and store.document("a") is None
    changes = store.changes_since(0)
    assert [(c.seq, c.document_id, c.kind) for c in changes] == [(1, "a", "put"), (2, "b", "put"), (3, "a", "delete")]
    assert store.changes_since(2) == changes[2:] and store.changes_since(3) == []


def test_changes_are_visible_to_another_handle(make_store):
    writer, reader = make_store(), make_store()
    writer.put(stored("a", "alpha text", "h1"))
    assert reader.last_seq() == 1 and reader.document("a").content_hash == "h1"
    assert [c.document_id for c in reader.changes_since(0, limit=10)] == ["a"]


def test_changes_since_pages_with_limit(make_store):
    store = make_store()
    for i in range(7):
        store.put(stored(f"d{i}", f"text {i}", f"h{i}"))
    first = store.changes_since(0, limit=3)
    assert [c.seq for c in first] == [1, 2, 3]
    assert [c.seq for c in store.changes_since(first[-1].seq, limit=10)] == [4, 5, 6, 7]


def test_a_reader_behind_a_trimmed_log_is_told_to_rebuild(make_store):
    store = make_store(max_changes=2)
    for i in range(250):  # Redis trims approximately (whole stream nodes of 100 entries)
        store.put(stored(f"d{i}", f"text {i}", f"h{i}"))
    with pytest.raises(ChangeLogGap):
        store.changes_since(0)
    assert [c.seq for c in store.changes_since(248)] == [249, 250]
    with pytest.raises(ChangeLogGap):
        store.changes_since(251)  # a reader ahead of the store: the store was reset


def test_open_store_picks_by_url(tmp_path, redis_server):
    embedded, remote = open_store("", tmp_path), open_store(redis_server)
    assert isinstance(embedded, EmbeddedStore) and isinstance(remote, RedisStore)
    embedded.close(), remote.close()
    with pytest.raises(ValueError, match="unsupported store URL"):
        open_store("postgres://x")
    with pytest.raises(ValueError, match="data directory"):
        open_store("", "")


def test_embedded_store_survives_reopen(tmp_path):
    store = EmbeddedStore(tmp_path)
    store.put(stored("a", "persisted text", "h1"))
    store.close()
    again = EmbeddedStore(tmp_path)
    assert again.document("a").content_hash == "h1" and again.last_seq() == 1
    again.close()
