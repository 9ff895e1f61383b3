"""--shard K/N, tools/merge_corpus.py and data_path globs: the parts of a corpus packed apart read as one pack."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from cpt_ds.pack.packing import PackOptions, pack_corpus
from cpt_ds.pack.sources import InputFile, PackError, parse_shard, select_shard
from cpt_ds.pack.writer import IndexedTokenWriter
from cpt_ds.token_file import IndexedTokenFile, TokenFileError, resolve_token_prefixes, shard_plan

from conftest import DRIVERS, launch, run_config, train_losses, write_config
from helpers_data import chinese_documents, english_documents, load_tool, output_files, write_jsonl

pack_tool = load_tool("pack_corpus")
merge_tool = load_tool("merge_corpus")


def file_bytes(prefix) -> dict[str, bytes]:
    return {suffix: Path(f"{prefix}{suffix}").read_bytes() for suffix in (".bin", ".idx", ".json")}


def documents(prefix) -> list[list[int]]:
    token_file = IndexedTokenFile(prefix)
    return [token_file.document(i).tolist() for i in range(token_file.num_documents)]


@pytest.fixture(scope="module")
def five_files(tmp_path_factory) -> Path:
    """Five jsonl files of unequal sizes, each document unique."""
    root = tmp_path_factory.mktemp("shards")
    texts = [t.replace("\n", " ") for t in chinese_documents() + english_documents(40)]
    sizes = [30, 5, 5, 40, 15]
    start = 0
    for name, size in zip("abcde", sizes, strict=True):
        part = texts[start : start + size]
        write_jsonl(root / "in" / f"{name}.jsonl", [f"{name}{i}: {t}" for i, t in enumerate(part)])
        start += size
    return root


def test_shards_hold_every_document_once_and_merge_into_one_pack(tmp_path, five_files, tiny_dir, capsys):
    inputs = [str(five_files / "in")]
    union = tmp_path / "union"
    pack_corpus(inputs, tiny_dir, union, PackOptions(), workers=1)
    parts = tmp_path / "parts" / "part"
    for k in (1, 2, 3):
        summary = pack_corpus(inputs, tiny_dir, parts, PackOptions(), workers=1, shard=(k, 3))
        assert summary.output_prefix == f"{parts}-{k:05d}-of-00003"
    prefixes = resolve_token_prefixes(f"{parts}-*")
    assert prefixes == [f"{parts}-{k:05d}-of-00003" for k in (1, 2, 3)]
    assert resolve_token_prefixes(str(parts.parent)) == prefixes  # a folder of token files reads the same

    # Every document exactly once, in the union's order; every input file in exactly one shard.
    assert sum((documents(p) for p in prefixes), []) == documents(union)
    shard_inputs = [[Path(i["path"]).name for i in IndexedTokenFile(p).meta["inputs"]] for p in prefixes]
    assert sum(shard_inputs, []) == [f"{n}.jsonl" for n in "abcde"] and all(shard_inputs)
    plan = shard_plan([((five_files / "in" / f"{n}.jsonl").as_posix(), (five_files / "in" / f"{n}.jsonl").stat().st_size)
                       for n in "abcde"], 3)
    assert [IndexedTokenFile(p).meta["shard"] for p in prefixes] == [{"index": k, "count": 3, "plan": plan}
                                                                     for k in (1, 2, 3)]

    merged = tmp_path / "merged"
    assert merge_tool.main([str(merged), f"{parts}-*"]) == 0
    assert "merged 3 token files" in capsys.readouterr().out
    assert file_bytes(merged)[".bin"] == file_bytes(union)[".bin"]
    assert file_bytes(merged)[".idx"] == file_bytes(union)[".idx"]
    merged_meta = json.loads(file_bytes(merged)[".json"])
    record = merged_meta.pop("merged_from")
    assert [part["prefix"] for part in record["parts"]] == prefixes
    assert merged_meta == json.loads(file_bytes(union)[".json"])
    IndexedTokenFile(merged).verify()


def test_shards_are_contiguous_byte_balanced_and_never_empty():
    sizes = [100, 1, 1, 1, 100, 1, 50, 50]
    files = [InputFile(Path(f"{i}.txt"), "txt", None, size) for i, size in enumerate(sizes)]
    for count in range(1, len(files) + 1):
        shards = [select_shard(files, k, count) for k in range(1, count + 1)]
        assert sum(shards, []) == files and all(shards)
    # 304 bytes: shard k starts at the first file with at least (k - 1) * 304 / 3 bytes before it.
    assert [[f.num_bytes for f in select_shard(files, k, 3)] for k in (1, 2, 3)] == [[100, 1, 1], [1, 100],
                                                                                   [1, 50, 50]]
    assert [len(select_shard(files, k, 8)) for k in range(1, 9)] == [1] * 8


@pytest.mark.parametrize(("spec", "fragment"), [
    ("3/2", "--shard '3/2': K must lie in 1..N"),
    ("0/0", "--shard '0/0': K must lie in 1..N and N must be at least 1"),
    ("two/4", "--shard 'two/4' is not K/N"),
    ("6/6", "--shard 6/6: only 5 input files to split into 6 parts; use at most 5 shards"),
])
def test_bad_shard_specs_give_one_clear_error(tmp_path, five_files, tiny_dir, capsys, spec, fragment):
    prefix = tmp_path / "out" / "part"
    code = pack_tool.main(["--input", str(five_files / "in"), "--tokenizer", str(tiny_dir), "--output", str(prefix),
                           "--shard", spec, "--workers", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and fragment in err, err
    assert not prefix.parent.exists() or list(prefix.parent.iterdir()) == []
    with pytest.raises(PackError):
        parse_shard(spec) if spec != "6/6" else select_shard([], 6, 6)


def test_merge_refuses_mixed_tokenizers_dtypes_and_sidecars(tmp_path, five_files, tiny_dir, capsys):
    other = tmp_path / "other_tokenizer"
    shutil.copytree(tiny_dir, other)
    config = json.loads((other / "tokenizer_config.json").read_text())
    (other / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 999}))
    a_input, b_input = five_files / "in" / "a.jsonl", five_files / "in" / "b.jsonl"
    pack_corpus([a_input], tiny_dir, tmp_path / "a", PackOptions(), workers=1)
    pack_corpus([b_input], other, tmp_path / "b", PackOptions(), workers=1)
    for dtype, name in ((np.uint16, "u16"), (np.int32, "i32")):
        with IndexedTokenWriter(tmp_path / name, dtype=dtype) as writer:
            writer.add_document(np.array([1, 2, 3]))
            writer.finalize()
        (tmp_path / f"{name}.json").unlink()  # plain Megatron files
    cases = {
        "tokenizer": ([tmp_path / "a", tmp_path / "b"], ["was not packed like", "tokenizer fingerprint"]),
        "dtype": ([tmp_path / "u16", tmp_path / "i32"], ["holds int32 tokens but", "holds uint16"]),
        "sidecar": ([tmp_path / "a", tmp_path / "u16"], [f"{tmp_path / 'u16.json'} is missing"]),
        "nothing": ([tmp_path / "nothing-*"], ["matches no token file"]),
    }
    for name, (parts, fragments) in cases.items():
        out = tmp_path / "merged" / name
        code = merge_tool.main([str(out), *map(str, parts)])
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1, (name, err)
        assert all(fragment in err for fragment in fragments), (name, err)
        assert not out.parent.exists() or output_files(out) == []


def test_data_path_globs_and_folders_name_complete_shard_sets(tmp_path):
    with pytest.raises(TokenFileError, match="pattern .* matches no token file"):
        resolve_token_prefixes(str(tmp_path / "part-*"))
    (tmp_path / "notes.txt").write_text("not a token file")
    with pytest.raises(TokenFileError, match=f"folder {tmp_path} matches no token file"):
        resolve_token_prefixes(str(tmp_path))
    for k in (1, 3):
        with IndexedTokenWriter(tmp_path / f"part-{k:05d}-of-00003", dtype=np.uint16) as writer:
            writer.add_document(np.array([1, 2]))
            writer.finalize({"vocab_size": 8})
    with pytest.raises(TokenFileError, match=r"holds 2 of the 3 shards .* \(missing: .*part-00002-of-00003\)"):
        resolve_token_prefixes(str(tmp_path / "part-*"))
    (tmp_path / "part-00002-of-00003.partial").mkdir()
    with pytest.raises(TokenFileError, match="includes the unfinished pack .*part-00002-of-00003.partial"):
        resolve_token_prefixes(str(tmp_path))
    assert resolve_token_prefixes(str(tmp_path / "plain")) == [str(tmp_path / "plain")]  # a prefix: as given


def test_training_on_the_shards_glob_equals_the_merged_file_and_one_pack(assets, tmp_path):
    """2 ranks, fp32, a few steps: the same losses from the shards (glob), their merge and one pack of all."""
    sources = [assets.root / "text" / "corpus.jsonl", assets.root / "text" / "corpus_b.jsonl"]
    data = tmp_path / "data"
    for k in (1, 2):
        pack_corpus(sources, assets.tokenizer, data / "shards" / "part", PackOptions(), workers=1, shard=(k, 2))
    pack_corpus(sources, assets.tokenizer, data / "union", PackOptions(), workers=1)
    assert merge_tool.main([str(data / "merged"), str(data / "shards" / "part-*")]) == 0
    runs = {"glob": data / "shards" / "part-*", "merged": data / "merged", "union": data / "union"}
    configs = [str(write_config(run_config(assets, tmp_path / name, data_path=[str(entry)], max_steps=3),
                                tmp_path / f"{name}.json")) for name, entry in runs.items()]
    # One launch trains the three runs in turn (tests/drivers/train_several.py): start-up paid once.
    launch(configs, workdir=tmp_path / "work", script=DRIVERS / "train_several.py").check()
    losses = {name: train_losses(tmp_path / name) for name in runs}
    assert len(losses["union"]) == 3
    assert losses["glob"] == losses["merged"] == losses["union"]
