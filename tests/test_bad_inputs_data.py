"""Bad data inputs, as a careless or hostile user gives them: one table, each row one clear error.

Every row runs a tool's ``main(argv)`` or training's preflight in-process and asserts the exit code
(the tool's own, or train.py's mapping of user errors to 2), the first line of the message, that it
is the only line, and that nothing was written or deleted: the row's folder and the token-check
cache hash the same before and after. One 2-rank ``train.py`` launch checks the real exit code for
a token file with ids outside the vocabulary.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from cpt_ds.config import RunConfig
from cpt_ds.fileio import cache_dir
from cpt_ds.pack.packing import PackOptions, pack_corpus
from cpt_ds.pack.writer import IndexedTokenWriter
from cpt_ds.preflight import preflight
from cpt_ds.token_check import check_ids
from cpt_ds.token_file import IndexedTokenFile, TokenFileError

from conftest import REPO, launch, run_config, write_config
from helpers_data import BAD_INPUT_NAMES, bad_input_cases, load_tool, write_bytes, write_jsonl

pack_tool = load_tool("pack_corpus")
merge_tool = load_tool("merge_corpus")
inspect_tool = load_tool("inspect_corpus")
extend_tool = load_tool("extend_vocab")


def _train_py_user_errors() -> tuple[type[Exception], ...]:
    spec = importlib.util.spec_from_file_location("train_entry", REPO / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.USER_ERRORS


USER_ERRORS = _train_py_user_errors()


# ---- the world a row runs in ------------------------------------------------------------------------


@dataclass
class World:
    tmp: Path
    assets: object
    tiny_dir: Path
    shards: Path
    capsys: object

    def copy(self, prefix: Path, to: Path) -> Path:
        """Copy a token file (all of .bin/.idx/.json there are) to prefix ``to``."""
        to.parent.mkdir(parents=True, exist_ok=True)
        for suffix in (".bin", ".idx", ".json"):
            if Path(f"{prefix}{suffix}").exists():
                shutil.copy(f"{prefix}{suffix}", f"{to}{suffix}")
        return to

    def tool(self, module, *argv: str) -> Callable[[], tuple[int, list[str]]]:
        def run() -> tuple[int, list[str]]:
            code = module.main([str(a) for a in argv])
            return code, self.capsys.readouterr().err.strip().splitlines()
        return run

    def pack(self, *argv: str) -> Callable[[], tuple[int, list[str]]]:
        return self.tool(pack_tool, *argv, "--tokenizer", self.tiny_dir, "--workers", "1", "--no-progress")

    def train(self, **fields) -> Callable[[], tuple[int, list[str]]]:
        """train.py's verdict on a run (preflight in-process): exit 2 and the problem lines, or 0."""
        config = RunConfig.from_flat(run_config(self.assets, self.tmp / "run_out", **fields))

        def run() -> tuple[int, list[str]]:
            try:
                preflight(config, world_size=1)
            except USER_ERRORS as error:
                lines = str(error).splitlines()
                return 2, [line.strip().removeprefix("- ") for line in lines[1:]] or lines
            return 0, []
        return run


def token_file(prefix: Path, documents: list[list[int]], dtype=np.uint16, meta: dict | None = None,
               sidecar: bool = True) -> Path:
    with IndexedTokenWriter(prefix, dtype=dtype) as writer:
        for document in documents:
            writer.add_document(np.array(document))
        writer.finalize(meta or {"vocab_size": 512})
    if not sidecar:
        Path(f"{prefix}.json").unlink()
    return prefix


def flip_two_bytes(prefix: Path, token: int) -> None:
    """Bit rot: token ``token`` of a uint16 file becomes 65,535 (the sidecar keeps the old sha256)."""
    with open(f"{prefix}.bin", "r+b") as handle:
        handle.seek(2 * token)
        handle.write(b"\xff\xff")


def set_sidecar(prefix: Path, **fields) -> None:
    path = Path(f"{prefix}.json")
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


@pytest.fixture(scope="module")
def shards(tmp_path_factory, assets) -> Path:
    """Shards of two plans: ``a/part`` 1/2 and 2/2 over in/{a,b,c}.jsonl, ``b/part`` 2/2 over a list with d added."""
    root = tmp_path_factory.mktemp("plans")
    for name, count in (("a", 6), ("b", 3), ("c", 5), ("d", 4)):
        write_jsonl(root / "in" / f"{name}.jsonl", [f"{name} document {i} " * 3 for i in range(count)])
    listed = [root / "in" / f"{name}.jsonl" for name in "abc"]
    for k in (1, 2):
        pack_corpus(listed, assets.tokenizer, root / "a" / "part", PackOptions(), workers=1, shard=(k, 2))
    pack_corpus([*listed, root / "in" / "d.jsonl"], assets.tokenizer, root / "b" / "part", PackOptions(), workers=1,
                shard=(2, 2))
    return root


# ---- the table --------------------------------------------------------------------------------------
# name -> (build(world) -> run, expected exit code, fragments of the first line)

Row = tuple[Callable[[World], Callable[[], tuple[int, list[str]]]], int, list[str]]


def _shard(world: World, plan: str, k: int, to: str) -> Path:
    return world.copy(world.shards / plan / f"part-{k:05d}-of-00002", world.tmp / to / f"part-{k:05d}-of-00002")


def _stale_shards(world: World) -> Path:
    _shard(world, "a", 1, "mixed")
    _shard(world, "b", 2, "mixed")
    return world.tmp / "mixed"


def _aliased(world: World) -> list[str]:
    prefix = world.copy(world.assets.corpus, world.tmp / "packs" / "en")
    return [str(prefix), str(world.tmp / "packs" / ".." / "packs" / "en")]


def _linked(world: World) -> list[str]:
    prefix = world.copy(world.assets.corpus, world.tmp / "packs" / "en")
    (world.tmp / "links").mkdir()
    for suffix in (".bin", ".idx", ".json"):
        os.symlink(f"{prefix}{suffix}", world.tmp / "links" / f"en{suffix}")
    return ["0.5", str(prefix), "0.5", str(world.tmp / "links" / "en")]


def _merged_beside_parts(world: World) -> str:
    _shard(world, "a", 1, "zh")
    _shard(world, "a", 2, "zh")
    assert merge_tool.main([str(world.tmp / "zh" / "all"), str(world.tmp / "zh" / "part-*")]) == 0
    world.capsys.readouterr()
    return str(world.tmp / "zh")


def _rotted(world: World) -> str:
    prefix = world.copy(world.assets.corpus, world.tmp / "rot" / "corpus")
    flip_two_bytes(prefix, 10)
    return str(prefix)


def _megatron_bad_ids(world: World) -> str:
    return str(token_file(world.tmp / "megatron" / "c", [[1, 2, 3], [4, 700, 5]], sidecar=False))


def _wider_vocab(world: World) -> str:
    prefix = world.copy(world.assets.corpus, world.tmp / "wide" / "corpus")
    set_sidecar(prefix, max_token_id=600)
    return str(prefix)


def _nul_file(world: World, name: str) -> Path:
    return write_bytes(world.tmp / name, b"\x00" * 4000)


def _corrupt(world: World, how: str) -> Path:
    prefix = token_file(world.tmp / "c", [[1, 2, 3], [4, 5]])
    if how == "truncated":
        Path(f"{prefix}.bin").write_bytes(Path(f"{prefix}.bin").read_bytes()[:-2])
    elif how == "magic":
        raw = bytearray(Path(f"{prefix}.idx").read_bytes())
        raw[:3] = b"XYZ"
        Path(f"{prefix}.idx").write_bytes(bytes(raw))
    elif how == "no index":
        Path(f"{prefix}.idx").unlink()
    elif how == "sidecar":
        set_sidecar(prefix, num_tokens=99)
    return prefix


def _existing_pack_rows() -> dict[str, Row]:
    """The pack_corpus rows of tests/test_pack_corpus.py's table, re-checked here."""
    def build(name: str):
        def make(world: World):
            args, _ = bad_input_cases(world.tmp, world.tiny_dir)[name]
            return world.tool(pack_tool, *args, "--output", world.tmp / "out" / "c", "--workers", "1", "--no-progress")
        return make

    return {f"pack: {name}": (build(name), 2, ["pack_corpus: error: "]) for name in BAD_INPUT_NAMES}


ROWS: dict[str, Row] = {
    # -- issue 20: shards carry the whole plan
    "merge: shards of two plans": (
        lambda w: w.tool(merge_tool, w.tmp / "out" / "all", _stale_shards(w) / "part-*"), 2,
        ["merge_corpus: error: merge_corpus: shards", "were cut from different input lists (3 vs 4 input files",
         "d.jsonl is in the second list only", "same --input list"]),
    "merge: a missing shard": (
        lambda w: w.tool(merge_tool, w.tmp / "out" / "all", _shard(w, "a", 1, "one")), 2,
        ["1 of the 2 shards of part are missing (part-00002-of-00002)", "--shard K/2"]),
    "merge: a shard named twice": (
        lambda w: w.tool(merge_tool, w.tmp / "out" / "all", _shard(w, "a", 1, "x"), _shard(w, "a", 1, "y"),
                         _shard(w, "a", 2, "x")), 2,
        ["shard 1 of 2 of part is named twice", "name each part once"]),
    "merge: shards out of order": (
        lambda w: w.tool(merge_tool, w.tmp / "out" / "all", _shard(w, "a", 2, "x"), _shard(w, "a", 1, "x")), 2,
        ["the shards of part are not given in shard order", "(shards 2, 1)"]),
    "train: data_path glob over shards of two plans": (
        lambda w: w.train(data_path=[str(_stale_shards(w) / "part-*")]), 2,
        ["data_path", "were cut from different input lists"]),
    "train: the same shard twice in data_path": (
        lambda w: w.train(data_path=[str(_shard(w, "a", 1, "x")), str(_shard(w, "a", 1, "y"))]), 2,
        ["shard 1 of 2 of part is named twice"]),
    # -- token files checked before training uses them
    "train: bit-rotted .bin (sha256 no longer matches)": (
        lambda w: w.train(data_path=[_rotted(w)]), 2,
        ["rot/corpus.bin: sha256", "does not match its sidecar's", "token 10 (document 0, offset 10) has id 65,535",
         "tools/inspect_corpus.py", "--verify"]),
    "train: Megatron file with ids >= vocabulary": (
        lambda w: w.train(data_path=[_megatron_bad_ids(w)]), 2,
        ["megatron/c.bin: token 4 (document 1, offset 1) has id 700, outside the model's vocabulary [0, 512)",
         "--verify --vocab-size 512"]),
    "train: sidecar max_token_id >= vocabulary": (
        lambda w: w.train(data_path=[_wider_vocab(w)]), 2,
        ["wide/corpus.bin: its sidecar records token id 600 but the model's vocabulary has 512 rows"]),
    "train: eval set with ids >= vocabulary": (
        lambda w: w.train(eval_data_path=[f"bad={_megatron_bad_ids(w)}"], validation_split_percentage=0.0), 2,
        ["megatron/c.bin: token 4 (document 1, offset 1) has id 700"]),
    # -- outputs that would be hidden files
    "pack: --output out/": (
        lambda w: w.pack("--input", write_jsonl(w.tmp / "t.jsonl", ["a"]), "--output", f"{w.tmp / 'out'}/"), 2,
        ["pack_corpus: error: --output", "is a folder or ends in a hidden name", "--output", "out/corpus"]),
    "pack: --output an existing folder": (
        lambda w: (w.tmp / "out").mkdir() or w.pack("--input", write_jsonl(w.tmp / "t.jsonl", ["a"]),
                                                     "--output", w.tmp / "out"), 2,
        ["is a folder or ends in a hidden name"]),
    "merge: OUT out/": (
        lambda w: w.tool(merge_tool, f"{w.tmp / 'out'}/", _shard(w, "a", 1, "x"), _shard(w, "a", 2, "x")), 2,
        ["merge_corpus: error: OUT", "is a folder or ends in a hidden name"]),
    "pack: --output inside an input folder": (
        lambda w: w.pack("--input", write_jsonl(w.tmp / "raw" / "t.jsonl", ["a"]).parent,
                         "--output", w.tmp / "raw" / "sub" / ".." / "corpus"), 2,
        ["lies inside the input folder", "would be read as inputs by the next run"]),
    # -- blend components compared by resolved path
    "train: one token file under two spellings": (
        lambda w: w.train(data_path=_aliased(w)), 2,
        ["data_path:", "packs/en' and", "packs/../packs/en' are the same token file", "name it once"]),
    "train: one token file and a symlink to it": (
        lambda w: w.train(data_path=_linked(w)), 2, ["links/en' are the same token file"]),
    "train: a folder holding a merged file and its parts": (
        lambda w: w.train(data_path=[_merged_beside_parts(w)]), 2,
        ["zh/all (from", "is a merge of", "part-00001-of-00002", "keep either the merged file or its parts"]),
    # -- NUL bytes are not text
    "pack: a .txt of NUL bytes": (
        lambda w: w.pack("--input", _nul_file(w, "nul.txt"), "--output", w.tmp / "out" / "c"), 2,
        ["nul.txt: NUL byte at byte offset 0 (line 1), so this is a binary file, not UTF-8 text"]),
    "pack: a .jsonl.gz with a NUL byte": (
        lambda w: w.pack("--input", write_bytes(w.tmp / "n.jsonl.gz", b'{"text": "a"}\n{"text": "b\x00"}\n'),
                         "--output", w.tmp / "out" / "c"), 2,
        ["n.jsonl.gz: NUL byte at byte offset 25 of the decompressed data (line 2)"]),
    "extend_vocab: a .txt of NUL bytes": (
        lambda w: w.tool(extend_tool, "--input", _nul_file(w, "nul.txt"), "--tokenizer", w.tiny_dir,
                         "--output", w.tmp / "tok", "--num-new-tokens", "10", "--workers", "1", "--no-progress"), 2,
        ["nul.txt: NUL byte at byte offset 0"]),
    # -- re-checked from the existing data tests (test_pack_shards, test_indexed, test_pack_corpus, test_blend)
    "pack: --shard 3/2": (
        lambda w: w.pack("--input", w.shards / "in", "--output", w.tmp / "out" / "p", "--shard", "3/2"), 2,
        ["--shard '3/2': K must lie in 1..N"]),
    "pack: --shard 6/6 over 4 files": (
        lambda w: w.pack("--input", w.shards / "in", "--output", w.tmp / "out" / "p", "--shard", "6/6"), 2,
        ["only 4 input files to split into 6 parts"]),
    "merge: nothing matches": (
        lambda w: w.tool(merge_tool, w.tmp / "out" / "all", w.tmp / "nothing-*"), 2, ["matches no token file"]),
    "merge: the output is one of the parts": (
        lambda w: w.tool(merge_tool, _shard(w, "a", 1, "x"), _shard(w, "a", 1, "x")), 2,
        ["is also one of the parts"]),
    "train: data_path glob missing a shard (by name)": (
        lambda w: w.train(data_path=[str(_shard(w, "a", 1, "x").parent / "part-*")]), 2,
        ["holds 1 of the 2 shards", "part-00002-of-00002"]),
    "train: data_path folder with an unfinished pack": (
        lambda w: (_shard(w, "a", 1, "x").parent / "part-00002-of-00002.partial").mkdir() or
        w.train(data_path=[str(w.tmp / "x")]), 2, ["includes the unfinished pack"]),
    "train: the same prefix twice": (
        lambda w: w.train(data_path=[str(w.assets.corpus)] * 2), 2, ["names", "twice; name each prefix once"]),
    "inspect: truncated .bin": (
        lambda w: w.tool(inspect_tool, _corrupt(w, "truncated")), 2, ["c.bin: token data is", "(truncated)"]),
    "inspect: bad magic": (lambda w: w.tool(inspect_tool, _corrupt(w, "magic")), 2, ["c.idx: bad magic"]),
    "inspect: .bin without .idx": (
        lambda w: w.tool(inspect_tool, _corrupt(w, "no index")), 2, ["interrupted write"]),
    "inspect: sidecar disagrees with the index": (
        lambda w: w.tool(inspect_tool, _corrupt(w, "sidecar")), 2, ["sidecar disagrees with the index"]),
    "inspect --verify: bit rot": (
        lambda w: w.tool(inspect_tool, _rotted(w), "--verify"), 2, ["does not match the sidecar"]),
    "inspect --verify: ids >= vocabulary": (
        lambda w: w.tool(inspect_tool, _megatron_bad_ids(w), "--verify", "--vocab-size", "512"), 2,
        ["has id 700, outside the vocabulary [0, 512)"]),
    **_existing_pack_rows(),
}


def snapshot(*folders: Path) -> dict[str, str]:
    """Every file under ``folders`` with the sha256 of its bytes (links by their target)."""
    found = {}
    for folder in folders:
        for path in sorted(folder.rglob("*")) if folder.exists() else []:
            if path.is_symlink():
                found[str(path)] = "-> " + os.readlink(path)
            elif path.is_file():
                found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                found[str(path)] = "folder"
    return found


@pytest.mark.parametrize("name", list(ROWS))
def test_bad_data_input(name, tmp_path, assets, tiny_dir, shards, capsys):
    build, expected_code, fragments = ROWS[name]
    world = World(tmp=tmp_path, assets=assets, tiny_dir=tiny_dir, shards=shards, capsys=capsys)
    run = build(world)
    capsys.readouterr()
    watched = (tmp_path, cache_dir() / "token_checks", shards)
    before = snapshot(*watched)
    code, lines = run()
    assert code == expected_code, (code, lines)
    assert len(lines) == 1, lines
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert snapshot(*watched) == before


# ---- beyond the table: warnings, the cache, the real exit code --------------------------------------


def test_an_eval_set_that_is_training_data_is_a_warning(assets, tmp_path, caplog):
    """Compared by resolved file and by sidecar sha256 (a copy); logged once, by rank 0."""
    World(tmp_path, assets, Path(), Path(), None).copy(assets.corpus, tmp_path / "copy" / "corpus")
    copy = str(tmp_path / "copy" / ".." / "copy" / "corpus")
    config = RunConfig.from_flat(run_config(
        assets, tmp_path / "out", data_path=[str(assets.corpus)], validation_split_percentage=0.0,
        eval_data_path=[f"same={copy}", f"alias={assets.corpus}"]))
    for rank in (0, 1):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="cpt_ds"):
            preflight(config, world_size=2, rank=rank)
        warnings = [r.getMessage() for r in caplog.records if "eval_data_path" in r.getMessage()]
        if rank == 1:
            assert warnings == []
            continue
        tail = "of data_path: its eval loss is measured on training data; pass a held-out token file"
        assert warnings == [
            f"eval_data_path {copy!r} holds the same tokens (sidecar sha256) as the training file "
            f"{str(assets.corpus)!r} {tail}",
            f"eval_data_path {str(assets.corpus)!r} is the training file {str(assets.corpus)!r} {tail}"], warnings


def test_the_check_reads_a_file_once_and_sees_any_later_change(tmp_path, monkeypatch):
    prefix = token_file(tmp_path / "c", [[1, 2, 3], [4, 5]])
    reads = []
    import cpt_ds.token_check as token_check

    real_scan = token_check.scan
    monkeypatch.setattr(token_check, "scan", lambda *a, **k: reads.append(1) or real_scan(*a, **k))
    check_ids(IndexedTokenFile(prefix), 512)
    check_ids(IndexedTokenFile(prefix), 512)
    assert len(reads) == 1 and Path(f"{prefix}.bin.checked").is_file()
    flip_two_bytes(prefix, 1)  # same size; mtime moves
    with pytest.raises(TokenFileError, match="does not match its sidecar's"):
        check_ids(IndexedTokenFile(prefix), 512)
    assert len(reads) == 2
    # A folder we may not write to (simulated: the tests may run as root): the facts go to the user's cache.
    other = token_file(tmp_path / "ro" / "c", [[7, 8]])
    real_write = token_check.atomic_write_text

    def refuse_beside(path, text):
        if path.parent == tmp_path / "ro":
            raise PermissionError(13, "Permission denied")
        real_write(path, text)

    monkeypatch.setattr(token_check, "atomic_write_text", refuse_beside)
    check_ids(IndexedTokenFile(other), 512)
    check_ids(IndexedTokenFile(other), 512)
    assert len(reads) == 3 and not Path(f"{other}.bin.checked").exists()
    assert any(json.loads(p.read_text())["identity"]["path"] == str(Path(f"{other}.bin").resolve())
               for p in (cache_dir() / "token_checks").iterdir())


def test_train_py_refuses_ids_outside_the_vocabulary_with_exit_2(assets, tmp_path):
    """Before: trained to the end (exit 0) with only a no-sidecar warning, or died with an IndexError (exit 1)
    when a sample holding the bad id was drawn."""
    bad = token_file(tmp_path / "megatron" / "c", [[1, 2, 3] * 30, [4, 700, 5] * 30], sidecar=False)
    path = write_config(run_config(assets, tmp_path / "out", data_path=[str(assets.corpus), str(bad)],
                                   eval_steps=1), tmp_path / "run.json")
    result = launch(["--config", str(path)], workdir=tmp_path)
    assert result.returncode == 2, result.output[-3000:]
    assert f"{bad}.bin: token 91 (document 1, offset 1) has id 700, outside the model's vocabulary [0, 512)" \
        in result.output
    assert "Traceback" not in result.output and not (tmp_path / "out" / "metrics.jsonl").exists()
