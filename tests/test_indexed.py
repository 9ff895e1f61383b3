"""The MMIDIDX token file: layout, round trips, Megatron compatibility, and rejection of bad files."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from cpt_ds.pack.writer import IndexedTokenWriter
from cpt_ds.token_file import IndexedTokenFile, TokenFileError, paths_for, token_dtype_for_vocab

LLAMA3_VOCAB = 128_256


def write_documents(prefix: Path, documents: list[np.ndarray], dtype, vocab_size: int) -> None:
    with IndexedTokenWriter(prefix, dtype=dtype) as writer:
        for document in documents:
            writer.add_document(document)
        writer.finalize({"vocab_size": vocab_size})


def synthetic_documents(seed: int = 0, count: int = 50, high: int = LLAMA3_VOCAB) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    documents = [rng.integers(0, high, size=int(rng.integers(1, 300)), dtype=np.int64) for _ in range(count)]
    if high > 100_000:
        documents[3] = np.array([high - 1, 65_535, 65_536, 100_000, 0, high - 1])  # above uint16, and the maximum
    return documents


# ---- Megatron's reader logic, re-stated independently (not our reader) -----------------------------
# Follows MMIDIDX reading in NVIDIA/Megatron-LM megatron/core/datasets/indexed_dataset.py
# (_IndexReader.__init__ and IndexedDataset.get): header, then int32 lengths, int64 pointers, int64
# document indices; sequence i = count lengths[i] items of dtype at byte pointers[i] of .bin.
MEGATRON_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64,
                   7: np.float32, 8: np.uint16}


def megatron_read(prefix: Path) -> tuple[np.dtype, list[np.ndarray], np.ndarray]:
    """(dtype, sequences, document indices) exactly as Megatron's reader sees them."""
    raw = Path(f"{prefix}.idx").read_bytes()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    (version,) = struct.unpack("<Q", raw[9:17])
    assert version == 1
    (code,) = struct.unpack("<B", raw[17:18])
    dtype = np.dtype(MEGATRON_DTYPES[code])
    sequence_count, document_count = struct.unpack("<QQ", raw[18:34])
    offset = 34
    lengths = struct.unpack(f"<{sequence_count}i", raw[offset : offset + 4 * sequence_count])
    offset += 4 * sequence_count
    pointers = struct.unpack(f"<{sequence_count}q", raw[offset : offset + 8 * sequence_count])
    offset += 8 * sequence_count
    document_indices = np.array(struct.unpack(f"<{document_count}q", raw[offset : offset + 8 * document_count]))
    assert offset + 8 * document_count == len(raw), "nothing may follow the document indices"
    data = Path(f"{prefix}.bin").read_bytes()
    sequences = [np.frombuffer(data, dtype=dtype, count=n, offset=p) for n, p in zip(lengths, pointers, strict=True)]
    return dtype, sequences, document_indices


def megatron_write(prefix: Path, sequences: list[list[int]], document_ends: list[int], dtype=np.int32) -> None:
    """Write a file as Megatron's IndexedDatasetBuilder would, documents spanning several sequences."""
    itemsize = np.dtype(dtype).itemsize
    Path(f"{prefix}.bin").write_bytes(b"".join(np.array(s, dtype=dtype).tobytes() for s in sequences))
    pointers = np.cumsum([0] + [len(s) * itemsize for s in sequences[:-1]])
    code = {np.dtype(v): k for k, v in MEGATRON_DTYPES.items()}[np.dtype(dtype)]
    document_indices = [0] + document_ends
    with open(f"{prefix}.idx", "wb") as handle:
        handle.write(b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", code))
        handle.write(struct.pack("<Q", len(sequences)) + struct.pack("<Q", len(document_indices)))
        handle.write(struct.pack(f"<{len(sequences)}i", *[len(s) for s in sequences]))
        handle.write(struct.pack(f"<{len(sequences)}q", *pointers))
        handle.write(struct.pack(f"<{len(document_indices)}q", *document_indices))


# ---- round trips --------------------------------------------------------------------------------------


def test_dtype_follows_megatron_threshold():
    assert token_dtype_for_vocab(32_000) == np.uint16
    assert token_dtype_for_vocab(65_499) == np.uint16
    assert token_dtype_for_vocab(65_500) == np.int32
    assert token_dtype_for_vocab(LLAMA3_VOCAB) == np.int32


def test_ids_above_uint16_survive_round_trip(tmp_path):
    documents = synthetic_documents()
    write_documents(tmp_path / "c", documents, np.int32, LLAMA3_VOCAB)
    token_file = IndexedTokenFile(tmp_path / "c")
    assert token_file.dtype == np.int32
    assert token_file.num_documents == len(documents)
    assert token_file.num_tokens == sum(d.size for d in documents)
    for index, document in enumerate(documents):
        np.testing.assert_array_equal(token_file.document(index), document)
    np.testing.assert_array_equal(token_file.document(3),
                                  [LLAMA3_VOCAB - 1, 65_535, 65_536, 100_000, 0, LLAMA3_VOCAB - 1])
    np.testing.assert_array_equal(token_file.document(-1), documents[-1])
    stream = np.concatenate(documents)
    np.testing.assert_array_equal(token_file.tokens(17, 1234), stream[17:1234])
    np.testing.assert_array_equal(token_file.document_lengths, [d.size for d in documents])
    token_file.verify()  # checksum and every id < vocab


def test_uint16_file_for_small_vocab(tmp_path):
    documents = synthetic_documents(high=1024)
    write_documents(tmp_path / "c", documents, token_dtype_for_vocab(1024), 1024)
    token_file = IndexedTokenFile(tmp_path / "c")
    assert token_file.dtype == np.uint16
    assert paths_for(tmp_path / "c")[0].stat().st_size == 2 * token_file.num_tokens
    for index, document in enumerate(documents):
        np.testing.assert_array_equal(token_file.document(index), document)


def test_writer_refuses_ids_that_do_not_fit(tmp_path):
    with IndexedTokenWriter(tmp_path / "c", dtype=np.uint16) as writer:
        with pytest.raises(ValueError, match="65535"):
            writer.add_document(np.array([1, 70_000]))
    assert list(tmp_path.iterdir()) == []


def test_written_file_matches_published_layout(tmp_path):
    documents = synthetic_documents(count=7)
    write_documents(tmp_path / "c", documents, np.int32, LLAMA3_VOCAB)
    raw = (tmp_path / "c.idx").read_bytes()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    assert struct.unpack("<Q", raw[9:17]) == (1,)
    assert raw[17] == 4  # int32
    num_sequences, num_document_indices = struct.unpack("<QQ", raw[18:34])
    assert (num_sequences, num_document_indices) == (7, 8)
    lengths = struct.unpack("<7i", raw[34:62])
    pointers = struct.unpack("<7q", raw[62:118])
    document_indices = struct.unpack("<8q", raw[118:182])
    assert len(raw) == 182
    assert list(lengths) == [d.size for d in documents]
    assert list(pointers) == [4 * sum(d.size for d in documents[:i]) for i in range(7)]
    assert list(document_indices) == list(range(8))
    data = (tmp_path / "c.bin").read_bytes()
    assert len(data) == 4 * sum(lengths)
    for document, pointer in zip(documents, pointers, strict=True):
        assert struct.unpack(f"<{document.size}i", data[pointer : pointer + 4 * document.size]) == tuple(document)


def test_megatron_reader_reads_our_file(tmp_path):
    documents = synthetic_documents(count=20)
    write_documents(tmp_path / "c", documents, np.int32, LLAMA3_VOCAB)
    dtype, sequences, document_indices = megatron_read(tmp_path / "c")
    assert dtype == np.int32
    np.testing.assert_array_equal(document_indices, np.arange(21))
    for sequence, document in zip(sequences, documents, strict=True):
        np.testing.assert_array_equal(sequence, document)


def test_we_read_a_megatron_file_with_multi_sequence_documents(tmp_path):
    # Megatron's --split-sentences writes one sequence per sentence; document 0 = sequences 0-2.
    sequences = [[5, 6, 7], [8], [9, 10], [70_000, 11], [12, 13, 14, 15]]
    megatron_write(tmp_path / "m", sequences, document_ends=[3, 4, 5])
    token_file = IndexedTokenFile(tmp_path / "m")
    assert token_file.meta is None and token_file.num_documents == 3 and token_file.num_tokens == 12
    np.testing.assert_array_equal(token_file.document(0), [5, 6, 7, 8, 9, 10])
    np.testing.assert_array_equal(token_file.document(1), [70_000, 11])
    np.testing.assert_array_equal(token_file.document(2), [12, 13, 14, 15])
    token_file.verify(vocab_size=LLAMA3_VOCAB)
    with pytest.raises(TokenFileError, match="vocabulary size is unknown"):
        token_file.verify()


def test_interrupted_writer_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with IndexedTokenWriter(tmp_path / "c", dtype=np.int32) as writer:
            writer.add_document(np.arange(10))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(TokenFileError, match="not found"):
        IndexedTokenFile(tmp_path / "c")


def test_existing_output_is_kept_unless_overwrite(tmp_path):
    write_documents(tmp_path / "c", [np.arange(4)], np.int32, 10)
    with pytest.raises(FileExistsError, match="--overwrite"):
        IndexedTokenWriter(tmp_path / "c", dtype=np.int32)
    write_documents_overwrite = IndexedTokenWriter(tmp_path / "c", dtype=np.int32, overwrite=True)
    with write_documents_overwrite as writer:
        writer.add_document(np.array([7, 8]))
        writer.finalize({"vocab_size": 10})
    np.testing.assert_array_equal(IndexedTokenFile(tmp_path / "c").document(0), [7, 8])


# ---- rejection of bad files -----------------------------------------------------------------------------


@pytest.fixture
def good_file(tmp_path) -> Path:
    write_documents(tmp_path / "c", synthetic_documents(count=10), np.int32, LLAMA3_VOCAB)
    return tmp_path / "c"


def patch_idx(prefix: Path, offset: int, data: bytes) -> None:
    raw = bytearray(Path(f"{prefix}.idx").read_bytes())
    raw[offset : offset + len(data)] = data
    Path(f"{prefix}.idx").write_bytes(bytes(raw))


def rejected(prefix: Path, *patterns: str) -> str:
    with pytest.raises(TokenFileError) as info:
        IndexedTokenFile(prefix)
    message = str(info.value)
    assert "\n" not in message
    for pattern in patterns:
        assert pattern in message, message
    return message


def test_truncated_bin_is_rejected(good_file):
    path = Path(f"{good_file}.bin")
    path.write_bytes(path.read_bytes()[:-4])
    rejected(good_file, str(path), "truncated", "copy or pack again")


def test_bin_longer_than_index_is_rejected(good_file):
    with open(f"{good_file}.bin", "ab") as handle:
        handle.write(b"\0\0\0\0")
    rejected(good_file, ".bin", "longer than its index")


def test_wrong_magic_is_rejected(good_file):
    patch_idx(good_file, 0, b"NOTMEGAT\x00")
    rejected(good_file, f"{good_file}.idx", "bad magic", "pack_corpus.py")


def test_wrong_version_is_rejected(good_file):
    patch_idx(good_file, 9, struct.pack("<Q", 2))
    rejected(good_file, f"{good_file}.idx", "unsupported index version 2")


@pytest.mark.parametrize(("code", "problem"), [(9, "unknown dtype code 9"), (7, "not an integer token type")])
def test_bad_dtype_code_is_rejected(good_file, code, problem):
    patch_idx(good_file, 17, bytes([code]))
    rejected(good_file, f"{good_file}.idx", problem)


def test_counts_that_disagree_with_index_size_are_rejected(good_file):
    patch_idx(good_file, 18, struct.pack("<Q", 11))
    rejected(good_file, f"{good_file}.idx", "implies", "pack the corpus again")


def test_empty_index_is_rejected(good_file):
    Path(f"{good_file}.idx").write_bytes(b"")
    rejected(good_file, f"{good_file}.idx", "shorter than the 34-byte header")


def test_sidecar_that_disagrees_is_rejected(good_file):
    path = Path(f"{good_file}.json")
    meta = json.loads(path.read_text())
    meta["num_tokens"] += 1
    path.write_text(json.dumps(meta))
    rejected(good_file, str(path), "num_tokens", "different packs")


def test_missing_index_next_to_bin_is_called_an_interrupted_write(good_file):
    Path(f"{good_file}.idx").unlink()
    rejected(good_file, "interrupted write")


def test_verify_rejects_ids_outside_vocab(tmp_path):
    documents = [np.array([1, 2, 3]), np.array([4, 500, 6])]
    write_documents(tmp_path / "c", documents, np.int32, vocab_size=500)
    token_file = IndexedTokenFile(tmp_path / "c")  # opening does not read every id
    with pytest.raises(TokenFileError) as info:
        token_file.verify()
    message = str(info.value)
    assert f"{tmp_path / 'c'}.bin" in message and "token 4 (document 1) has id 500" in message
    assert "[0, 500)" in message and "pack it again" in message


def test_verify_rejects_corrupt_tokens(good_file):
    path = Path(f"{good_file}.bin")
    raw = bytearray(path.read_bytes())
    raw[40] ^= 1  # same size, one flipped bit: only the checksum sees it
    path.write_bytes(bytes(raw))
    token_file = IndexedTokenFile(good_file)
    with pytest.raises(TokenFileError, match="does not match the sidecar"):
        token_file.verify()
