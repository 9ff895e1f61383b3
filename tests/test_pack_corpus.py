"""tools/pack_corpus.py and tools/inspect_corpus.py: round trips, determinism, bad input, interruption."""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cpt_ds import __version__
from cpt_ds import tokenizer as tokenizer_module
from cpt_ds.fileio import sha256_file
from cpt_ds.pack import workers as workers_module
from cpt_ds.pack.chunks import RawChunk
from cpt_ds.pack.encoders import IDENTITY_PROBE, EncoderMismatchError, FastEncoder, select_encoder
from cpt_ds.pack.packing import PackOptions, pack_corpus
from cpt_ds.pack.sources import PackError, discover_inputs
from cpt_ds.pack.workers import WorkerConfig, Workers
from cpt_ds.token_file import IndexedTokenFile, TokenFileError
from cpt_ds.tokenizer import decode, load_tokenizer, read_tokenizer, tokenizer_fingerprint

from helpers_data import (
    BAD_INPUT_NAMES,
    EDGE_CASES,
    LLAMA3_TOKENIZER,
    REPO,
    bad_input_cases,
    chinese_documents,
    english_documents,
    load_tool,
    multilingual_documents,
    output_files,
    requires_llama3,
    train_sentencepiece_tokenizer,
    write_bytes,
    write_jsonl,
)

pack_tool = load_tool("pack_corpus")
inspect_tool = load_tool("inspect_corpus")


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return load_tokenizer(tiny_dir)


def pack(inputs, tokenizer_dir, output, *, workers=1, chunk_bytes=4096, overwrite=False, **options):
    return pack_corpus([str(p) for p in inputs], tokenizer_dir, output, PackOptions(**options), workers=workers,
                       chunk_bytes=chunk_bytes, overwrite=overwrite)


def file_bytes(prefix: Path) -> dict[str, bytes]:
    return {suffix: Path(f"{prefix}{suffix}").read_bytes() for suffix in (".bin", ".idx", ".json")}


def documents(prefix: Path) -> list[np.ndarray]:
    token_file = IndexedTokenFile(prefix)
    return [np.array(token_file.document(i)) for i in range(token_file.num_documents)]


def assert_round_trip(prefix: Path, tokenizer, texts: list[str], *, bos: int | None, eos: int) -> None:
    """Every document is [BOS] + ids(text) + [EOS], with no EOS/BOS inside, and decodes to its text."""
    docs = documents(prefix)
    assert len(docs) == len(texts)
    inner_start = 0 if bos is None else 1
    for text, doc in zip(texts, docs, strict=True):
        assert doc[-1] == eos
        if bos is not None:
            assert doc[0] == bos
        inner = doc[inner_start:-1]
        assert eos not in inner and (bos is None or bos not in inner)
        assert decode(tokenizer, inner) == text


# ---- round trips ----------------------------------------------------------------------------------------


def test_round_trip_of_real_multilingual_text(tmp_path, tiny_dir, tiny):
    texts = multilingual_documents()
    source = write_jsonl(tmp_path / "in" / "zh_en.jsonl", texts)
    summary = pack([source], tiny_dir, tmp_path / "out" / "c")
    assert (summary.num_documents, summary.num_empty_skipped, summary.encoder) == (len(texts), 0, "tiktoken")
    assert summary.num_identity_checked_documents >= 1
    assert_round_trip(tmp_path / "out" / "c", tiny, texts, bos=tiny.bos_token_id, eos=tiny.eos_token_id)

    token_file = IndexedTokenFile(tmp_path / "out" / "c")
    token_file.verify()
    meta = token_file.meta
    assert meta["tokenizer"] == {"path": str(tiny_dir), "fingerprint": tokenizer_fingerprint(tiny_dir),
                                 "class": "TokenizersBackend"}
    assert (meta["vocab_size"], meta["bos_id"], meta["eos_id"], meta["add_bos"]) == (1024, 1022, 1023, True)
    assert (meta["num_documents"], meta["num_tokens"]) == (len(texts), summary.num_tokens)
    assert meta["inputs"] == [{"path": source.as_posix(), "bytes": source.stat().st_size,
                               "sha256": sha256_file(source), "num_documents": len(texts),
                               "num_tokens": summary.num_tokens, "num_empty_skipped": 0}]
    assert meta["options"] == {"txt_unit": "line", "json_key": "text", "bos": "auto", "encoding_errors": "strict",
                               "encoder": "auto"}
    assert meta["bin_sha256"] == sha256_file(tmp_path / "out" / "c.bin")
    assert meta["tool_version"] == __version__ and meta["dtype"] == "uint16"


@requires_llama3
def test_round_trip_with_real_llama3(tmp_path):
    tokenizer = load_tokenizer(LLAMA3_TOKENIZER)
    texts = chinese_documents() + english_documents(10) + EDGE_CASES
    source = write_jsonl(tmp_path / "zh_en.jsonl", texts)
    summary = pack([source], LLAMA3_TOKENIZER, tmp_path / "c", workers=2)
    assert summary.encoder == "tiktoken" and summary.dtype == "int32"
    assert_round_trip(tmp_path / "c", tokenizer, texts, bos=128000, eos=128001)
    token_file = IndexedTokenFile(tmp_path / "c")
    assert int(np.max(token_file.tokens(0, token_file.num_tokens))) > 65_535
    assert Path(f"{tmp_path / 'c'}.bin").stat().st_size == 4 * summary.num_tokens
    token_file.verify()


@pytest.mark.parametrize(("which", "workers"), [("tiny", 1), ("tiny", 2),
                                                pytest.param("llama3", 2, marks=requires_llama3)])
def test_reading_the_tokenizer_without_transformers_changes_no_output_byte(tmp_path, monkeypatch, caplog, tiny_dir,
                                                                          which, workers):
    folder = tiny_dir if which == "tiny" else LLAMA3_TOKENIZER
    source = write_jsonl(tmp_path / "in.jsonl", multilingual_documents())
    light = pack([source], folder, tmp_path / "light", workers=workers)
    with monkeypatch.context() as patch, caplog.at_level(logging.INFO, logger="cpt_ds.tokenizer"):
        # AutoTokenizer's JSON is not tokenizer.json's text: workers build their HF encoder again.
        patch.setattr(tokenizer_module, "plain_folder_refusal", lambda *args: "forced by the test")
        auto = pack([source], folder, tmp_path / "auto", workers=workers)
    assert "with transformers.AutoTokenizer (not a plain tokenizer.json folder: forced by the test)" in caplog.text
    assert light.encoder == auto.encoder == "tiktoken"
    assert file_bytes(tmp_path / "light") == file_bytes(tmp_path / "auto")


def test_sentencepiece_tokenizer_packs_through_hf(tmp_path):
    sp_dir = train_sentencepiece_tokenizer(tmp_path / "sp")
    tokenizer = load_tokenizer(sp_dir)
    texts = [t for t in chinese_documents() + english_documents(10) + EDGE_CASES if not t[:1].isspace()]
    source = write_jsonl(tmp_path / "in.jsonl", texts)
    summary = pack([source], sp_dir, tmp_path / "c")
    assert summary.encoder == "hf" and summary.dtype == "uint16"
    assert_round_trip(tmp_path / "c", tokenizer, texts, bos=1, eos=2)


# ---- determinism --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mixed_corpus(tmp_path_factory) -> Path:
    """The same real text in every supported format, several chunks per file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("mixed")
    texts = [t.replace("\r", " ").replace("\n", " ") for t in chinese_documents() + english_documents(30)]
    lines = ("\n".join(texts) + "\n").encode()
    for name in ("a.txt", "b.txt.gz", "c.txt.zst"):
        write_bytes(root / name, lines)
    for name in ("d.jsonl", "e.jsonl.gz", "sub/f.jsonl.zst"):
        write_jsonl(root / name, texts)
    pq.write_table(pa.table({"text": texts}), root / "g.parquet", row_group_size=16)
    write_bytes(root / "h.parquet.zst", (root / "g.parquet").read_bytes())
    (root / "texts.json").write_text(json.dumps(texts))
    return root


def corpus_inputs(root: Path) -> list[str]:
    return [str(root / "[a-h].*"), str(root / "sub")]


def test_every_format_gives_the_same_documents(tmp_path, mixed_corpus, tiny_dir, tiny):
    texts = json.loads((mixed_corpus / "texts.json").read_text())
    summary = pack(corpus_inputs(mixed_corpus), tiny_dir, tmp_path / "c")
    assert summary.num_input_files == 8
    assert_round_trip(tmp_path / "c", tiny, texts * 8, bos=tiny.bos_token_id, eos=tiny.eos_token_id)
    inputs = IndexedTokenFile(tmp_path / "c").meta["inputs"]
    assert [Path(i["path"]).name for i in inputs] == ["a.txt", "b.txt.gz", "c.txt.zst", "d.jsonl", "e.jsonl.gz",
                                                     "g.parquet", "h.parquet.zst", "f.jsonl.zst"]
    assert len({i["num_tokens"] for i in inputs}) == 1


def test_output_is_byte_identical_across_workers_chunks_and_reruns(tmp_path, mixed_corpus, tiny_dir):
    inputs = corpus_inputs(mixed_corpus)
    pack(inputs, tiny_dir, tmp_path / "w1", workers=1, chunk_bytes=4096)
    pack(inputs, tiny_dir, tmp_path / "w2", workers=2, chunk_bytes=1024)
    pack(inputs, tiny_dir, tmp_path / "w2big", workers=2, chunk_bytes=1 << 20)
    reference = file_bytes(tmp_path / "w1")
    assert file_bytes(tmp_path / "w2") == reference
    assert file_bytes(tmp_path / "w2big") == reference
    pack(inputs, tiny_dir, tmp_path / "w1", workers=1, chunk_bytes=4096, overwrite=True)
    assert file_bytes(tmp_path / "w1") == reference


def test_fast_and_hf_encoders_write_the_same_tokens(tmp_path, mixed_corpus, tiny_dir):
    inputs = corpus_inputs(mixed_corpus)
    fast = pack(inputs, tiny_dir, tmp_path / "fast")
    hf = pack(inputs, tiny_dir, tmp_path / "hf", encoder="hf")
    assert (fast.encoder, hf.encoder) == ("tiktoken", "hf")
    assert file_bytes(tmp_path / "fast")[".bin"] == file_bytes(tmp_path / "hf")[".bin"]
    assert file_bytes(tmp_path / "fast")[".idx"] == file_bytes(tmp_path / "hf")[".idx"]


def test_chunks_in_flight_are_bounded(tiny_dir, tiny):
    """The main process reads ahead at most 2 * workers + 2 chunks, so memory does not grow with the corpus."""
    spec = select_encoder(tiny)
    config = WorkerConfig(spec, PackOptions(), tiny.bos_token_id, tiny.eos_token_id, "uint16")
    num_read = []

    def chunks():
        for index in range(40):
            num_read.append(index)
            yield RawChunk(0, "mem.jsonl", False, "jsonl", b'{"text": "hello world"}\n', index + 1, 0, 24)

    with Workers(2) as pool:
        pool.configure(config)
        encoded = pool.encode_in_order(chunks())
        first = next(encoded)
        assert first.lengths.size == 1 and first.tokens[0] == tiny.bos_token_id
        assert first.tokens[-1] == tiny.eos_token_id
        assert len(num_read) <= 2 * 2 + 2
        assert sum(1 for _ in encoded) == 39
    assert len(num_read) == 40


def test_workers_fork_only_from_a_single_threaded_caller(tmp_path, monkeypatch, tiny_dir, tiny):
    """A caller's own threads could hold locks a forked child would wait on; it gets spawned workers, same bytes."""
    import sys
    import threading

    source = write_jsonl(tmp_path / "in.jsonl", english_documents(40))
    release = threading.Event()
    busy = threading.Thread(target=release.wait)
    busy.start()
    try:
        assert workers_module.worker_start_method() == "spawn"
        pack([source], tiny_dir, tmp_path / "spawned", workers=2)
    finally:
        release.set()
        busy.join()
    # Other tests may leave idle threads in this process (tqdm's monitor, say): count as a lone caller.
    monkeypatch.setattr(workers_module.threading, "active_count", lambda: 1)
    assert workers_module.worker_start_method() == ("fork" if sys.platform.startswith("linux") else "spawn")
    pack([source], tiny_dir, tmp_path / "forked", workers=2)
    assert file_bytes(tmp_path / "spawned") == file_bytes(tmp_path / "forked")


def test_worker_reuses_the_hf_encoder_it_built_at_start_only_for_the_same_json(tmp_path, monkeypatch, tiny_dir,
                                                                               tiny):
    monkeypatch.setattr(workers_module, "_state", None)
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")  # restored after _init_worker sets it
    chunk = RawChunk(0, "mem.jsonl", False, "jsonl", b'{"text": "hello world"}\n', 1, 0, 24)
    for spec, reused in ((select_encoder(read_tokenizer(tiny_dir)), True), (select_encoder(tiny), False)):
        config_path = tmp_path / f"config_{reused}.pickle"
        config_path.write_bytes(pickle.dumps(WorkerConfig(spec, PackOptions(), 1022, 1023, "uint16")))
        workers_module._init_worker(str(config_path))
        workers_module._start_worker(str(tiny_dir / "tokenizer.json"))
        early = workers_module._state.early_hf[1]
        encoded = workers_module._encode_chunk(chunk)
        assert (workers_module._state.reference is early) is reused
        assert encoded.tokens.tolist() == [1022, *spec.build()[0].encode_batch(["hello world"])[0].tolist(), 1023]


def test_input_discovery_is_sorted_and_refuses_duplicates(tmp_path):
    for name in ("b/2.txt", "b/1.jsonl.zst", "a.parquet", "b/.hidden/x.txt", "b/.DS_Store", "c/3.txt.gz"):
        write_bytes(tmp_path / name, b"x\n")
    found = discover_inputs([str(tmp_path / "c" / "*.gz"), str(tmp_path / "b"), str(tmp_path / "a.parquet")])
    assert [(p.path.relative_to(tmp_path).as_posix(), p.format, p.compression) for p in found] == [
        ("a.parquet", "parquet", None), ("b/1.jsonl.zst", "jsonl", "zst"), ("b/2.txt", "txt", None),
        ("c/3.txt.gz", "txt", "gz")]
    with pytest.raises(PackError, match="named twice"):
        discover_inputs([str(tmp_path / "b"), str(tmp_path / "b" / "2.txt")])


def test_parquet_without_the_text_column(tmp_path, capsys, tiny_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["a"], "id": [1]}), tmp_path / "x.parquet")
    code, _, err = run_pack_cli(capsys, "--input", str(tmp_path / "x.parquet"), "--tokenizer", str(tiny_dir),
                                "--output", str(tmp_path / "c"))
    assert code == 2 and f"{tmp_path / 'x.parquet'}: no column 'text' (columns: content, id)" in err
    code, _, err = run_pack_cli(capsys, "--input", str(tmp_path / "x.parquet"), "--tokenizer", str(tiny_dir),
                                "--output", str(tmp_path / "c"), "--json-key", "id")
    assert code == 2 and "holds int64, not strings" in err
    assert output_files(tmp_path / "c") == []


# ---- document units, empties and BOS policy -----------------------------------------------------------


TXT = "\ufeffline one\r\nline two\n\n   \t\nthird para\nstill third\n\n\n\u3000\n last line no newline"


@pytest.mark.parametrize(("unit", "expected", "num_empty"), [
    ("line", ["line one", "line two", "third para", "still third", " last line no newline"], 5),
    ("paragraph", ["line one\nline two", "third para\nstill third", " last line no newline"], 0),
    ("file", [TXT[1:]], 0),
])
def test_txt_units(tmp_path, tiny_dir, tiny, unit, expected, num_empty):
    source = write_bytes(tmp_path / "in.txt", TXT.encode())
    summary = pack([source], tiny_dir, tmp_path / "c", txt_unit=unit)
    assert summary.num_empty_skipped == num_empty
    assert_round_trip(tmp_path / "c", tiny, expected, bos=tiny.bos_token_id, eos=tiny.eos_token_id)


def test_paragraphs_survive_small_chunks(tmp_path, tiny_dir, tiny):
    texts = [p.strip() for t in chinese_documents() + english_documents(5) for p in re.split(r"\n\s*\n", t)
             if p.strip()]
    separators = ["\n\n", "\r\n\r\n", "\n  \t\n\n", "\n\u3000\n", "\n\n\n\n"]
    body = "".join(text + separators[i % len(separators)] for i, text in enumerate(texts))
    source = write_bytes(tmp_path / "paragraphs.txt", body.encode())
    pack([source], tiny_dir, tmp_path / "c", txt_unit="paragraph", workers=2, chunk_bytes=1024)
    assert_round_trip(tmp_path / "c", tiny, texts, bos=tiny.bos_token_id, eos=tiny.eos_token_id)


def test_empty_documents_are_skipped_and_counted(tmp_path, tiny_dir, tiny):
    source = write_jsonl(tmp_path / "in.jsonl", ["first", "", "  \n\t", None, "second"])
    summary = pack([source], tiny_dir, tmp_path / "c")
    assert (summary.num_documents, summary.num_empty_skipped) == (2, 3)
    assert IndexedTokenFile(tmp_path / "c").meta["num_empty_documents_skipped"] == 3
    assert_round_trip(tmp_path / "c", tiny, ["first", "second"], bos=tiny.bos_token_id, eos=tiny.eos_token_id)


def tokenizer_variant(tiny_dir: Path, folder: Path, **config_changes) -> Path:
    shutil.copytree(tiny_dir, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    for key, value in config_changes.items():
        if value is None:
            config.pop(key)
        else:
            config[key] = value
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_bos_policy(tmp_path, tiny_dir, tiny):
    source = write_jsonl(tmp_path / "in.jsonl", ["one", "two"])
    eos = tiny.eos_token_id
    pack([source], tiny_dir, tmp_path / "never", bos="never")
    assert_round_trip(tmp_path / "never", tiny, ["one", "two"], bos=None, eos=eos)
    assert IndexedTokenFile(tmp_path / "never").meta["add_bos"] is False

    no_bos = tokenizer_variant(tiny_dir, tmp_path / "no_bos", bos_token=None)
    pack([source], no_bos, tmp_path / "auto_no_bos")
    assert_round_trip(tmp_path / "auto_no_bos", tiny, ["one", "two"], bos=None, eos=eos)
    with pytest.raises(PackError, match="no bos_token but --bos always"):
        pack([source], no_bos, tmp_path / "always_no_bos", bos="always")

    # GPT-2 style: BOS == EOS, so "auto" adds only the EOS; "always" adds both.
    same = tokenizer_variant(tiny_dir, tmp_path / "same", bos_token="<|end_of_text|>")
    pack([source], same, tmp_path / "auto_same")
    assert_round_trip(tmp_path / "auto_same", tiny, ["one", "two"], bos=None, eos=eos)
    pack([source], same, tmp_path / "always_same", bos="always")
    assert documents(tmp_path / "always_same")[0][0] == eos


# ---- bad input: one line, non-zero exit, nothing written --------------------------------------------


def run_pack_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = pack_tool.main([*args, "--workers", "1", "--no-progress"])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("case", BAD_INPUT_NAMES)
def test_bad_input_gives_one_line_and_writes_nothing(tmp_path, capsys, tiny_dir, case):
    args, fragments = bad_input_cases(tmp_path, tiny_dir)[case]
    prefix = tmp_path / "out" / "c"
    code, out, err = run_pack_cli(capsys, *args, "--output", str(prefix))
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pack_corpus: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert output_files(prefix) == []


def test_invalid_utf8_replaced_on_request(tmp_path, capsys, tiny_dir, tiny):
    source = write_bytes(tmp_path / "bad.txt", "ok\nbad \xff here\n".encode("latin-1"))
    code, _, err = run_pack_cli(capsys, "--input", str(source), "--tokenizer", str(tiny_dir),
                                "--output", str(tmp_path / "c"), "--encoding-errors", "replace")
    assert code == 0, err
    assert_round_trip(tmp_path / "c", tiny, ["ok", "bad \ufffd here"], bos=tiny.bos_token_id, eos=tiny.eos_token_id)


def test_existing_output_needs_overwrite(tmp_path, capsys, tiny_dir, tiny):
    source = write_jsonl(tmp_path / "in.jsonl", ["first version"])
    args = ["--input", str(source), "--tokenizer", str(tiny_dir), "--output", str(tmp_path / "c")]
    assert run_pack_cli(capsys, *args)[0] == 0
    before = file_bytes(tmp_path / "c")
    write_jsonl(tmp_path / "in.jsonl", ["second version"])
    code, _, err = run_pack_cli(capsys, *args)
    assert code == 2 and "output already exists" in err and "--overwrite" in err and len(err.splitlines()) == 1
    assert file_bytes(tmp_path / "c") == before
    assert run_pack_cli(capsys, *args, "--overwrite")[0] == 0
    assert_round_trip(tmp_path / "c", tiny, ["second version"], bos=tiny.bos_token_id, eos=tiny.eos_token_id)


def test_encoder_mismatch_during_pack_is_an_error(tmp_path, monkeypatch, tiny_dir):
    original = FastEncoder.encode_batch
    source = write_jsonl(tmp_path / "in.jsonl", english_documents(5))

    def off_by_one(probe_too: bool):
        def encode_batch(self, texts):
            ids = original(self, texts)
            if probe_too or texts[0] != IDENTITY_PROBE:
                ids[0] = ids[0] + 1
            return ids
        return encode_batch

    monkeypatch.setattr(FastEncoder, "encode_batch", off_by_one(probe_too=True))
    with pytest.raises(EncoderMismatchError, match="disagree on the identity probe at token 0"):
        pack([source], tiny_dir, tmp_path / "c")
    monkeypatch.setattr(FastEncoder, "encode_batch", off_by_one(probe_too=False))
    with pytest.raises(EncoderMismatchError, match=f"disagree on {source}:1 at token 0"):
        pack([source], tiny_dir, tmp_path / "c")
    assert output_files(tmp_path / "c") == []


# ---- interruption -----------------------------------------------------------------------------------------


def test_killed_pack_leaves_no_readable_output_and_rerun_succeeds(tmp_path, capsys, tiny_dir):
    texts = [t.replace("\n", " ") for t in english_documents(80) + chinese_documents()]
    source = write_bytes(tmp_path / "big.txt", ("\n".join(texts) + "\n").encode() * 25)
    prefix = tmp_path / "out" / "c"
    args = ["--input", str(source), "--tokenizer", str(tiny_dir), "--output", str(prefix), "--chunk-kb", "64"]
    process = subprocess.Popen([sys.executable, str(REPO / "tools" / "pack_corpus.py"), *args, "--workers", "1",
                                "--no-progress"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and process.poll() is None:
            partial = prefix.parent / "c.partial" / "tokens.bin"
            if partial.exists() and partial.stat().st_size > 0:
                break
            time.sleep(0.005)
        assert process.poll() is None, "pack finished before it could be killed: " + process.stderr.read().decode()
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    finally:
        if process.poll() is None:
            process.kill()
        process.stderr.close()
    assert [p.name for p in output_files(prefix)] == ["c.partial"]  # resumable state, no readable output
    with pytest.raises(TokenFileError, match="interrupted write|not found"):
        IndexedTokenFile(prefix)

    code, _, err = run_pack_cli(capsys, *args)
    assert code == 0, err
    assert [p.name for p in output_files(prefix)] == ["c.bin", "c.idx", "c.json"]
    clean = tmp_path / "clean" / "c"
    pack([source], tiny_dir, clean, chunk_bytes=1 << 20)
    assert file_bytes(prefix) == file_bytes(clean)


# ---- inspect_corpus ----------------------------------------------------------------------------------------


def test_inspect_summary_decode_and_verify(tmp_path, capsys, tiny_dir):
    texts = ["第一篇文档。", "The second document.", "三 three"]
    pack([write_jsonl(tmp_path / "in.jsonl", texts)], tiny_dir, tmp_path / "c")
    prefix = str(tmp_path / "c")
    assert inspect_tool.main([prefix, "--verify"]) == 0
    out = capsys.readouterr().out
    assert "documents     3" in out and "dtype         uint16" in out and "p50" in out
    assert "verify        OK: checksum matches the sidecar" in out
    assert inspect_tool.main([prefix, "--decode", "1"]) == 0
    assert capsys.readouterr().out == "The second document.\n"
    assert inspect_tool.main([prefix, "--decode", "3"]) == 2
    assert "document 3 does not exist" in capsys.readouterr().err
    other = tokenizer_variant(tiny_dir, tmp_path / "other", eos_token="<|begin_of_text|>")
    assert inspect_tool.main([prefix, "--decode", "0", "--tokenizer", str(other)]) == 2
    assert "is not the one" in capsys.readouterr().err

    Path(f"{prefix}.bin").write_bytes(Path(f"{prefix}.bin").read_bytes()[:-2])
    assert inspect_tool.main([prefix]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "truncated" in err and f"{prefix}.bin" in err
