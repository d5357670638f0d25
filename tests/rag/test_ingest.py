"""Ingestion: progress, idempotence by content hash, replacement, validation, files, and Meta-Chunking on
the real model."""

from __future__ import annotations

import pytest

from longbow.rag.ingest import IngestLimits, Ingestor, ingest_paths, read_documents
from longbow.rag.retrieve import HybridRetriever
from longbow.rag.store import EmbeddedStore
from longbow.rag.types import Document

DOCS = [Document("a", "Apples are red. They grow on trees.", {"kind": "fruit"}),
        Document("b", "Basalt is a volcanic rock. It is dark and dense.", {"kind": "rock"})]


@pytest.fixture
def store(tmp_path):
    store = EmbeddedStore(tmp_path / "rag")
    yield store
    store.close()


def test_progress_is_reported_after_each_write(store):
    seen = []

    def on_progress(progress):
        seen.append(progress)
        done = progress.documents_done
        assert len(store.document_ids()) == done  # acknowledged only once the store holds it

    report = Ingestor(store).ingest(DOCS, "sentence", 4, on_progress=on_progress)
    assert [p.documents_done for p in seen] == [1, 2] and seen[-1] == report
    assert report.documents_total == 2 and report.chunks_written == 4 and report.documents_unchanged == 0


def test_reingest_is_idempotent_and_changes_replace(store):
    ingestor = Ingestor(store)
    ingestor.ingest(DOCS, "sentence", 4)
    seq = store.last_seq()
    again = ingestor.ingest(DOCS, "sentence", 4)
    assert again.documents_unchanged == 2 and again.chunks_written == 0 and store.last_seq() == seq
    changed = Document("a", "Apples are green now.", {"kind": "fruit"})
    report = ingestor.ingest([changed, DOCS[1]], "sentence", 4)
    assert report.documents_unchanged == 1 and report.chunks_written == 1
    assert [c.text for c in store.document("a").chunks] == ["Apples are green now."]
    assert ingestor.ingest(DOCS[:1], "fixed", 4).documents_unchanged == 0  # new chunking re-chunks


@pytest.mark.parametrize("documents, target, message", [
    ([], 16, "no documents"),
    ([Document("a", "   ")], 16, "is empty"),
    ([Document("", "text")], 16, "document id"),
    ([Document("a", "x" * 101)], 16, "limit is 100"),
    ([Document("a", "one"), Document("a", "two")], 16, "appears twice"),
    ([Document(f"d{i}", "x") for i in range(4)], 16, "the limit is 3"),
    ([Document("a", "text")], 0, "target chunk length"),
    ([Document("a", "nul\x00byte")], 16, "NUL"),
])
def test_bad_input_is_rejected_before_any_write(store, documents, target, message):
    limits = IngestLimits(max_documents=3, max_document_chars=100)
    with pytest.raises(ValueError, match=message):
        Ingestor(store, limits=limits).ingest(documents, "sentence", target)
    assert store.last_seq() == 0
    with pytest.raises(ValueError, match="unknown chunker"):
        Ingestor(store).ingest(DOCS, "paragraph", 16)


def test_ingest_paths_reads_files_and_directories(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "one.md").write_text("# Ravens\nRavens can mimic human speech.")
    (tmp_path / "notes" / "skip.bin").write_bytes(b"\xff\x00")
    (tmp_path / "two.txt").write_text("Octopuses have three hearts.")
    paths = [tmp_path / "notes", tmp_path / "two.txt"]
    assert [d.document_id for d in read_documents(paths)] == [str(tmp_path / "notes" / "one.md"),
                                                               str(tmp_path / "two.txt")]
    report = ingest_paths(paths, data_dir=tmp_path / "rag", chunker="sentence", target_tokens=32)
    assert report.documents_done == 2 and report.chunks_written == 2
    store = EmbeddedStore(tmp_path / "rag")
    hit = HybridRetriever(store).retrieve("How many hearts does an octopus have?", 1)[0]
    assert hit.chunk.metadata["source"] == str(tmp_path / "two.txt")
    store.close()
    with pytest.raises(FileNotFoundError):
        read_documents([tmp_path / "missing"])


@pytest.mark.slow
def test_meta_chunking_on_the_real_model(store, engine_lm):
    text = ("The Amazon river carries more water than any other river. Its basin covers much of Brazil. "
            "Rainforest lines both banks for thousands of kilometres. "
            "Meanwhile, the stock market fell sharply on Monday. Investors sold technology shares. "
            "Bond yields rose as a result.")
    document = Document("mixed", text)
    for chunker in ("perplexity", "margin"):
        report = Ingestor(store, lm=engine_lm).ingest([document], chunker, 24)
        chunks = store.document("mixed").chunks
        assert report.chunks_written == len(chunks) >= 2
        assert "".join(c.text for c in chunks) == text and all(c.text for c in chunks)
        assert all(text[c.char_start:c.char_end] == c.text for c in chunks)


def test_one_default_chunker_everywhere():
    import inspect

    from longbow.rag.chunking import DEFAULT_CHUNKER
    from longbow.services.config import RagConfig

    assert inspect.signature(Ingestor.ingest).parameters["chunker"].default == DEFAULT_CHUNKER
    assert inspect.signature(ingest_paths).parameters["chunker"].default == DEFAULT_CHUNKER
    assert RagConfig().default_chunker == DEFAULT_CHUNKER == "perplexity"


def test_a_slow_chunker_reports_progress_after_every_document(store):
    """With groups of up to 256 chunks, three small documents would all be chunked before the first is
    written and reported; a chunker slower than progress_interval_s closes the group after each one."""
    clock = iter(range(0, 1000, 5))  # every reading 5 s later: each document's chunking "takes" 5 s
    reports, reported_before_chunking = [], []

    class Spy(Ingestor):
        def chunker(self, name, target_tokens):
            inner = super().chunker(name, target_tokens)
            original = inner.chunk
            inner.chunk = lambda *a: reported_before_chunking.append(len(reports)) or original(*a)
            return inner

    documents = [*DOCS, Document("c", "Cobalt is blue. It is a metal.")]
    ingestor = Spy(store, progress_interval_s=2.0)
    ingestor.clock = lambda: next(clock)
    ingestor.ingest(documents, "sentence", 64, on_progress=reports.append)
    assert reported_before_chunking == [0, 1, 2] and len(reports) == 3


def test_the_default_group_batches_fast_documents_into_one_embedding_call(store):
    calls = []

    class CountingEmbedder:
        dimensions = 384

        def embed(self, texts):
            import numpy as np

            calls.append(len(texts))
            return np.eye(1, 384, dtype=np.float32).repeat(len(texts), 0)

    Ingestor(store, CountingEmbedder(), progress_interval_s=3600).ingest(DOCS, "sentence", 4)
    assert calls == [4]  # both documents' chunks in one batch


def test_token_spans_without_the_engine_equal_the_lm_spans(tmp_path, engine_lm):
    """Chunk lengths in model tokens from the tokenizer alone (the CLI's sentence/fixed chunkers)."""
    from longbow.services.text.lm import load_token_spans

    spans = load_token_spans()
    text = "Dr. Smith's __len__ costs O(n) — naïve? 42 tokens,\n\n  spaced   out."
    assert spans(text) == engine_lm.tokenize_with_offsets(text)[1]
    store = EmbeddedStore(tmp_path / "t")
    Ingestor(store, token_spans=spans).ingest(DOCS, "fixed", 3)
    lengths = [len(spans(c.text)) for c in store.document("a").chunks]
    assert lengths[:-1] == [3] * (len(lengths) - 1) and len(lengths) > 2
    store.close()
