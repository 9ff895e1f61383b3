"""Hugging Face ``datasets`` inputs: save_to_disk folders and .arrow files (stream and file format)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cpt_ds.pack.chunks import iter_raw_chunks
from cpt_ds.pack.packing import PackOptions, pack_corpus
from cpt_ds.pack.sources import PackError, discover_inputs
from cpt_ds.token_file import IndexedTokenFile
from cpt_ds.tokenizer import decode, load_tokenizer

from helpers_data import chinese_documents, english_documents, load_tool, write_jsonl

pack_tool = load_tool("pack_corpus")


def texts() -> list[str]:
    return chinese_documents() + english_documents(20)


def decoded(prefix: Path, tokenizer) -> list[str]:
    token_file = IndexedTokenFile(prefix)
    return [decode(tokenizer, token_file.document(i)[1:-1]) for i in range(token_file.num_documents)]


def same_tokens(a: Path, b: Path) -> bool:
    return all(Path(f"{a}{s}").read_bytes() == Path(f"{b}{s}").read_bytes() for s in (".bin", ".idx"))


def test_save_to_disk_folder_round_trips(tmp_path, tiny_dir):
    import datasets

    docs = texts()
    dataset = datasets.Dataset.from_dict({"id": list(range(len(docs))), "content": docs})
    dataset.save_to_disk(str(tmp_path / "saved"), num_shards=3)
    reference = write_jsonl(tmp_path / "ref" / "docs.jsonl", docs)
    pack_corpus([reference], tiny_dir, tmp_path / "ref_pack", PackOptions(), workers=1)

    # The folder itself, and the folder met inside a larger input folder, with --json-key naming the column.
    (tmp_path / "tree").mkdir()
    (tmp_path / "saved").rename(tmp_path / "tree" / "saved")
    for name, spec in (("direct", tmp_path / "tree" / "saved"), ("nested", tmp_path / "tree")):
        summary = pack_corpus([spec], tiny_dir, tmp_path / name, PackOptions(json_key="content"),
                              workers=2 if name == "direct" else 1, chunk_bytes=2048)
        assert summary.num_input_files == 3 and summary.num_documents == len(docs)
        assert same_tokens(tmp_path / name, tmp_path / "ref_pack")
        inputs = IndexedTokenFile(tmp_path / name).meta["inputs"]
        assert [Path(i["path"]).name for i in inputs] == [f"data-{k:05d}-of-00003.arrow" for k in range(3)]
    assert decoded(tmp_path / "direct", load_tokenizer(tiny_dir)) == docs


def test_arrow_cache_files_in_stream_and_file_format(tmp_path, tiny_dir):
    import datasets
    import pyarrow as pa

    docs = texts()
    # A datasets cache file as the baseline's map() leaves it (Arrow stream format, 10-row batches).
    dataset = datasets.Dataset.from_dict({"text": docs})
    dataset.map(lambda row: row, cache_file_name=str(tmp_path / "in" / "cache-0001.arrow"), writer_batch_size=10)
    with pa.OSFile(str(tmp_path / "in" / "file_format.arrow"), "wb") as sink:
        with pa.ipc.new_file(sink, pa.schema([("text", pa.large_string())])) as writer:
            writer.write_table(pa.table({"text": pa.array(docs, pa.large_string())}), max_chunksize=7)
    sources = discover_inputs([str(tmp_path / "in" / "*.arrow")])
    assert [s.format for s in sources] == ["arrow", "arrow"]
    # Read in pieces of about the chunk size, not as a whole file.
    chunks = list(iter_raw_chunks(0, sources[0], txt_unit="line", json_key="text", chunk_bytes=4096))
    assert len(chunks) > 5 and sum(len(c.data) for c in chunks) == len(docs)

    summary = pack_corpus([str(tmp_path / "in" / "*.arrow")], tiny_dir, tmp_path / "c", PackOptions(), workers=1,
                          chunk_bytes=1024)
    assert summary.num_documents == 2 * len(docs)
    assert decoded(tmp_path / "c", load_tokenizer(tiny_dir)) == docs + docs


def test_bad_datasets_inputs_give_one_clear_error(tmp_path, tiny_dir, capsys):
    import datasets

    dataset = datasets.Dataset.from_dict({"content": ["a", "b"]})
    datasets.DatasetDict({"train": dataset, "test": dataset}).save_to_disk(str(tmp_path / "dict"))
    dataset.save_to_disk(str(tmp_path / "plain"))
    (tmp_path / "x.arrow.gz").write_bytes(b"")
    (tmp_path / "junk.arrow").write_bytes(b"not arrow at all")
    capsys.readouterr()  # datasets' own progress bars
    cases = [
        (tmp_path / "dict", ["is a saved DatasetDict (splits: train, test)", str(tmp_path / "dict" / "train")]),
        (tmp_path / "plain", ["no column 'text' (columns: content)", "--json-key"]),
        (tmp_path / "x.arrow.gz", ["compressed .arrow files are not read"]),
        (tmp_path / "junk.arrow", [f"{tmp_path / 'junk.arrow'}: cannot be read", "not an Arrow IPC file"]),
    ]
    for spec, fragments in cases:
        code = pack_tool.main(["--input", str(spec), "--tokenizer", str(tiny_dir), "--output", str(tmp_path / "out"),
                               "--workers", "1", "--no-progress"])
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert all(fragment in err for fragment in fragments), err
        assert not list(tmp_path.glob("out.*"))
    with pytest.raises(PackError, match="DatasetDict"):
        discover_inputs([str(tmp_path)])
