"""Resuming an interrupted pack: kill points, a failure on a bad file, and what invalidates the state.

Kills use the packer's test hook (``CPT_DS_PACK_FAULT``, see ``cpt_ds/pack/partial.py``) in a
subprocess, so each stops at a fixed point: inside a chunk, between chunks, and during the final
renames. A resumed pack must write the same ``.bin``/``.idx``/``.json`` bytes as an uninterrupted one.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cpt_ds.pack.chunks import iter_raw_chunks
from cpt_ds.pack.packing import PackOptions, pack_corpus
from cpt_ds.pack.partial import FAULT_ENV, InjectedFault
from cpt_ds.pack.sources import PackError, discover_inputs
from cpt_ds.token_file import IndexedTokenFile, TokenFileError

from helpers_data import REPO, chinese_documents, english_documents, output_files, write_bytes, write_jsonl

CHUNK = 1024


def texts() -> list[str]:
    return [t.replace("\r", " ").replace("\n", " ") for t in chinese_documents() + english_documents(20)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_dir):
    """Four inputs of four kinds (plain, gzip, parquet, arrow), a few dozen chunks each, and the
    reference pack of them; ``chunks[i]`` = chunk number (1-based, whole run) of file i's first chunk."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("resume")
    docs = texts()
    write_bytes(root / "in" / "a.txt", ("\n".join(docs) + "\n").encode())
    write_jsonl(root / "in" / "b.jsonl.gz", docs)
    pq.write_table(pa.table({"text": docs}), root / "in" / "c.parquet", row_group_size=7)
    with pa.ipc.new_stream(str(root / "in" / "d.arrow"), pa.schema([("text", pa.string())])) as writer:
        for start in range(0, len(docs), 5):
            writer.write_batch(pa.record_batch([pa.array(docs[start : start + 5])], names=["text"]))
    inputs = [str(root / "in")]
    first_chunk, number = [], 1
    for index, source in enumerate(discover_inputs(inputs)):
        first_chunk.append(number)
        number += sum(1 for _ in iter_raw_chunks(index, source, txt_unit="line", json_key="text", chunk_bytes=CHUNK))
    reference = root / "reference" / "c"
    pack_corpus(inputs, tiny_dir, reference, PackOptions(), workers=1, chunk_bytes=CHUNK)
    return {"root": root, "inputs": inputs, "first_chunk": first_chunk, "num_chunks": number - 1,
            "reference": reference}


def file_bytes(prefix: Path) -> dict[str, bytes]:
    return {suffix: Path(f"{prefix}{suffix}").read_bytes() for suffix in (".bin", ".idx", ".json")}


def pack_cli(inputs: list[str], tokenizer: Path, output: Path, *, fault: str | None, extra: tuple[str, ...] = ()):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.pop(FAULT_ENV, None)
    if fault:
        env[FAULT_ENV] = fault
    return subprocess.run([sys.executable, str(REPO / "tools" / "pack_corpus.py"), "--input", *inputs, "--tokenizer",
                           str(tokenizer), "--output", str(output), "--workers", "1", "--chunk-kb", str(CHUNK >> 10),
                           "--checkpoint-seconds", "0", "--no-progress", *extra],
                          env=env, capture_output=True, text=True, timeout=300)


def kill_point(corpus, which: str) -> str:
    first = corpus["first_chunk"]
    return {
        "inside a gzip chunk": f"kill-mid-chunk:{first[1] + 2}",
        "between parquet chunks": f"kill-after-chunk:{first[2] + 1}",
        "between arrow chunks": f"kill-after-chunk:{first[3] + 1}",
        "before the renames": "kill-before-publish",
        "between the renames": "kill-mid-publish",
    }[which]


@pytest.mark.parametrize("which", ["inside a gzip chunk", "between parquet chunks", "between arrow chunks",
                                   "before the renames", "between the renames"])
def test_killed_pack_resumes_to_identical_bytes(tmp_path, tiny_dir, corpus, caplog, which):
    prefix = tmp_path / "out" / "c"
    killed = pack_cli(corpus["inputs"], tiny_dir, prefix, fault=kill_point(corpus, which))
    assert killed.returncode == -9, killed.stderr[-3000:]
    with pytest.raises(TokenFileError):
        IndexedTokenFile(prefix)
    assert (prefix.parent / "c.partial" / "state.json").exists()

    # The same command again (here through the API, with another chunk size: it changes no byte).
    with caplog.at_level(logging.INFO, logger="cpt_ds.pack.partial"):
        summary = pack_corpus(corpus["inputs"], tiny_dir, prefix, PackOptions(), workers=1, chunk_bytes=4 * CHUNK)
    assert file_bytes(prefix) == file_bytes(corpus["reference"])
    assert [p.name for p in output_files(prefix)] == ["c.bin", "c.idx", "c.json"]
    if "renames" in which:
        assert "finishing the interrupted publish" in caplog.text
        assert summary.num_resumed_documents == summary.num_documents
    else:
        assert "resuming the partial pack" in caplog.text
        assert 0 < summary.num_resumed_documents < summary.num_documents
    IndexedTokenFile(prefix).verify()


def interrupted(prefix: Path, tiny_dir: Path, inputs: list[str], monkeypatch, chunk: int, **options) -> None:
    """A pack that stops with an error after ``chunk`` chunks (committing each), leaving its partial state."""
    monkeypatch.setenv(FAULT_ENV, f"raise-after-chunk:{chunk}")
    with pytest.raises(InjectedFault):
        pack_corpus(inputs, tiny_dir, prefix, PackOptions(**options), workers=1, chunk_bytes=CHUNK,
                    checkpoint_seconds=3600)  # only the commit on the error: it must hold everything written
    monkeypatch.delenv(FAULT_ENV)
    assert (prefix.parent / "c.partial" / "state.json").exists()


def tokenizer_variant(tiny_dir: Path, folder: Path) -> Path:
    shutil.copytree(tiny_dir, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["model_max_length"] = 12345  # another fingerprint, the same tokens
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("change", ["option", "first input", "tokenizer", "--no-resume"])
def test_changed_option_input_or_tokenizer_discards_the_partial_state(tmp_path, tiny_dir, corpus, monkeypatch,
                                                                      caplog, change):
    root = tmp_path / "in"
    shutil.copytree(corpus["root"] / "in", root)
    inputs = [str(root)]
    prefix = tmp_path / "out" / "c"
    interrupted(prefix, tiny_dir, inputs, monkeypatch, corpus["first_chunk"][2] + 1)
    tokenizer, options, resume = tiny_dir, {}, True
    expected = {
        "option": "changed since it was written: bos_id 1022 -> null; options.bos auto -> never",
        "first input": f"input {(root / 'a.txt').as_posix()} changed",
        "tokenizer": "changed since it was written: tokenizer_fingerprint",
        "--no-resume": "--no-resume: discarding the partial pack",
    }[change]
    if change == "option":
        options = {"bos": "never"}
    elif change == "first input":
        with open(root / "a.txt", "a", encoding="utf-8") as handle:
            handle.write("one more line\n")
    elif change == "tokenizer":
        tokenizer = tokenizer_variant(tiny_dir, tmp_path / "tokenizer")
    else:
        resume = False
    with caplog.at_level(logging.INFO, logger="cpt_ds.pack.partial"):
        summary = pack_corpus(inputs, tokenizer, prefix, PackOptions(**options), workers=1, chunk_bytes=CHUNK,
                              resume=resume)
    assert expected in caplog.text
    assert summary.num_resumed_documents == 0
    fresh = tmp_path / "fresh" / "c"
    pack_corpus(inputs, tokenizer, fresh, PackOptions(**options), workers=1, chunk_bytes=CHUNK)
    assert file_bytes(prefix) == file_bytes(fresh)


def test_failure_on_a_bad_file_resumes_from_that_file_once_fixed(tmp_path, tiny_dir, caplog, capsys):
    """Hours into a pack a file turns out malformed: the files before it are kept, only it is redone."""
    docs = texts()
    write_jsonl(tmp_path / "in" / "a.jsonl", docs)
    bad = write_bytes(tmp_path / "in" / "b.jsonl",
                      "".join(json.dumps({"text": t}) + "\n" for t in docs[:30]).encode() + b'{"text": "cut\n')
    inputs = [str(tmp_path / "in")]
    prefix = tmp_path / "out" / "c"
    with pytest.raises(PackError, match=f"{bad}:31: malformed JSON"):
        pack_corpus(inputs, tiny_dir, prefix, PackOptions(), workers=1, chunk_bytes=CHUNK, checkpoint_seconds=3600)
    assert (prefix.parent / "c.partial" / "state.json").exists() and not Path(f"{prefix}.idx").exists()

    write_jsonl(bad, docs[:30] + ["cut"])
    with caplog.at_level(logging.INFO, logger="cpt_ds.pack.partial"):
        summary = pack_corpus(inputs, tiny_dir, prefix, PackOptions(), workers=1, chunk_bytes=CHUNK)
    assert f"input {bad.as_posix()} changed" in caplog.text and "resuming from its start" in caplog.text
    assert summary.num_resumed_documents == len(docs)  # all of a.jsonl, none of b.jsonl
    fresh = tmp_path / "fresh" / "c"
    pack_corpus(inputs, tiny_dir, fresh, PackOptions(), workers=1, chunk_bytes=CHUNK)
    assert file_bytes(prefix) == file_bytes(fresh)


def test_a_second_pack_on_the_same_output_is_refused(tmp_path, tiny_dir):
    source = write_jsonl(tmp_path / "in.jsonl", ["one", "two"])
    partial = tmp_path / "c.partial"
    partial.mkdir()
    with open(partial / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # as a running pack holds it
        with pytest.raises(PackError, match="another pack is writing .* right now"):
            pack_corpus([source], tiny_dir, tmp_path / "c", PackOptions(), workers=1)
    pack_corpus([source], tiny_dir, tmp_path / "c", PackOptions(), workers=1)
    assert IndexedTokenFile(tmp_path / "c").num_documents == 2 and not partial.exists()


def test_workers_end_with_a_killed_packer(tmp_path, tiny_dir, corpus):
    """A SIGKILLed (or OOM-killed) packer must not leave its worker processes behind."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           FAULT_ENV: "kill-after-chunk:3"}
    process = subprocess.Popen([sys.executable, str(REPO / "tools" / "pack_corpus.py"), "--input", *corpus["inputs"],
                                "--tokenizer", str(tiny_dir), "--output", str(tmp_path / "c"), "--workers", "2",
                                "--chunk-kb", "1", "--no-progress"], env=env, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert process.wait(timeout=120) == -9

    def session_members() -> list[int]:
        members = []
        for entry in Path("/proc").iterdir():
            try:
                if entry.name.isdigit() and os.getsid(int(entry.name)) == process.pid:
                    members.append(int(entry.name))
            except (ProcessLookupError, PermissionError):
                continue
        return members

    deadline = time.monotonic() + 10
    while session_members() and time.monotonic() < deadline:
        time.sleep(0.05)
    left = session_members()
    for pid in left:  # do not leave them running when the check fails
        os.kill(pid, signal.SIGKILL)
    assert left == []
