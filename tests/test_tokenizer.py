"""Tokenizer folders, the tiny LLaMA-3-shaped tokenizer, and identity of the fast and HF encoders."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cpt_ds.pack import encoders as encoders_module
from cpt_ds.pack.encoders import (
    IDENTITY_PROBE,
    LLAMA3_SPLIT_PATTERN,
    MERGES_CACHE_NAME,
    EncoderMismatchError,
    FastEncoder,
    HFEncoder,
    cache_dir,
    check_identity,
    plan_fast_encoder,
    select_encoder,
)
from cpt_ds.pack.tiny_tokenizer import BOS_TOKEN, EOS_TOKEN, train_tokenizer
from cpt_ds.tokenizer import (
    TokenizerError,
    decode,
    load_tokenizer,
    read_tokenizer,
    tokenizer_fingerprint,
    tokenizer_info,
)

from helpers_data import (
    EDGE_CASES,
    LLAMA3_TOKENIZER,
    REPO,
    chinese_documents,
    english_documents,
    multilingual_documents,
    requires_llama3,
    tokenizer_training_texts,
    train_sentencepiece_tokenizer,
    write_jsonl,
)


@pytest.fixture(scope="module")
def tiny_spec(tiny_dir):
    return select_encoder(load_tokenizer(tiny_dir))


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory) -> Path:
    return train_sentencepiece_tokenizer(tmp_path_factory.mktemp("sp"))


def special_ids(tokenizer) -> set[int]:
    return {int(i) for i in tokenizer.all_special_ids} | {int(i) for i in tokenizer.added_tokens_decoder}


# ---- the tiny LLaMA-3-shaped tokenizer -----------------------------------------------------------


def test_tiny_tokenizer_is_llama3_shaped(tiny_dir):
    tokenizer = load_tokenizer(tiny_dir)
    assert len(tokenizer) == 1024
    # Specials come after the BPE ids, as in LLaMA-3 (128000 = BOS, 128001 = EOS).
    assert tokenizer.convert_ids_to_tokens([1022, 1023]) == [BOS_TOKEN, EOS_TOKEN]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1022, 1023)
    spec = json.loads((tiny_dir / "tokenizer.json").read_text())
    assert spec["model"]["type"] == "BPE" and spec["model"]["ignore_merges"] is True
    assert spec["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] == LLAMA3_SPLIT_PATTERN
    assert max(spec["model"]["vocab"].values()) < 1022
    assert len([t for t in spec["model"]["vocab"] if len(t) == 1]) >= 256  # the full byte alphabet


def test_tiny_tokenizer_is_fast_path_eligible(tiny_spec):
    assert tiny_spec.name == "tiktoken", tiny_spec.reason


def test_tiny_tokenizer_training_is_deterministic_and_fast(tmp_path):
    texts = tokenizer_training_texts() * 3
    assert sum(len(t.encode()) for t in texts) > 1_000_000
    started = time.perf_counter()
    first = train_tokenizer(texts, tmp_path / "a", vocab_size=2048)
    assert time.perf_counter() - started < 5
    second = train_tokenizer(texts, tmp_path / "b", vocab_size=2048)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes()


def test_tiny_tokenizer_pads_small_vocab_with_reserved_specials(tmp_path):
    folder = train_tokenizer(["hello world"] * 3, tmp_path / "t", vocab_size=300)
    tokenizer = load_tokenizer(folder)
    assert len(tokenizer) == 300
    assert tokenizer.convert_ids_to_tokens(299).startswith("<|reserved_special_token_")
    assert tokenizer.eos_token_id == tokenizer.bos_token_id + 1 < 300
    with pytest.raises(ValueError, match="at least 258"):
        train_tokenizer(["x"], tmp_path / "u", vocab_size=257)


# ---- fast encoder == HF tokenizers --------------------------------------------------------------


def assert_identical(spec, texts):
    encoder, reference = spec.build()
    assert reference is not None
    fast = encoder.encode_batch(texts)
    hf = reference.encode_batch(texts)
    for text, a, b in zip(texts, fast, hf, strict=True):
        np.testing.assert_array_equal(a, b, err_msg=repr(text[:80]))
    assert check_identity(texts, fast, reference) == sum(a.size for a in hf) > 0
    return fast


def test_fast_encoder_identical_on_multilingual_text_and_edge_cases(tiny_dir, tiny_spec):
    texts = multilingual_documents() + [IDENTITY_PROBE]
    fast = assert_identical(tiny_spec, texts)
    tokenizer = load_tokenizer(tiny_dir)
    for text, ids in zip(texts, fast, strict=True):
        assert decode(tokenizer, ids) == text


@pytest.fixture(scope="module")
def llama3():
    tokenizer = load_tokenizer(LLAMA3_TOKENIZER)
    return tokenizer, select_encoder(tokenizer)


@requires_llama3
def test_fast_encoder_identical_with_real_llama3(llama3):
    tokenizer, spec = llama3
    assert spec.name == "tiktoken", spec.reason
    real = json.loads((LLAMA3_TOKENIZER / "tokenizer.json").read_text())
    assert real["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] == LLAMA3_SPLIT_PATTERN
    texts = multilingual_documents() + [IDENTITY_PROBE]
    fast = assert_identical(spec, texts)
    assert max(int(ids.max()) for ids in fast) > 65_535  # Chinese uses ids beyond uint16
    for text, ids in zip(texts, fast, strict=True):
        assert decode(tokenizer, ids) == text
    encoder, _ = spec.build()
    np.testing.assert_array_equal(encoder.encode_batch(["hello world"])[0], [15339, 1917])


@requires_llama3
def test_llama3_special_literals_stay_text(llama3):
    tokenizer, spec = llama3
    encoder, reference = spec.build()
    text = "before <|end_of_text|> middle <|begin_of_text|> after"
    for ids in (encoder.encode_batch([text])[0], reference.encode_batch([text])[0]):
        assert not set(ids.tolist()) & {128000, 128001}
        assert decode(tokenizer, ids) == text


def test_special_literals_stay_text_on_both_paths(tiny_dir, tiny_spec, sp_dir):
    text = f"x {EOS_TOKEN} y {BOS_TOKEN} z <s> </s>"
    for folder, spec in ((tiny_dir, tiny_spec), (sp_dir, select_encoder(load_tokenizer(sp_dir)))):
        tokenizer = load_tokenizer(folder)
        encoders = [e for e in spec.build() if e is not None] + [HFEncoder(spec.tokenizer_json)]
        for encoder in encoders:
            ids = encoder.encode_batch([text])[0]
            assert not set(ids.tolist()) & special_ids(tokenizer), (folder, encoder.name)
            assert decode(tokenizer, ids).endswith("z <s> </s>")


def test_check_identity_names_document_and_position(tiny_spec):
    encoder, reference = tiny_spec.build()
    texts = english_documents(3)
    ids = encoder.encode_batch(texts)
    ids[1] = ids[1].copy()
    ids[1][5] += 1
    with pytest.raises(EncoderMismatchError) as info:
        check_identity(texts, ids, reference, labels=["a.txt:1", "a.txt:2", "a.txt:3"])
    assert "a.txt:2 at token 5" in str(info.value) and "--encoder hf" in str(info.value)


def test_fast_encoder_refuses_a_regex_that_drops_text(tiny_spec):
    plan = tiny_spec.fast_plan
    # \p{L}+ alone skips spaces and digits: tiktoken would silently drop them.
    leaky = type(plan)(r"\p{L}+", plan.mergeable_ranks, plan.special_tokens)
    encoder = FastEncoder(leaky)
    assert encoder.encode_batch(["onlyletters"])[0].size > 0
    with pytest.raises(EncoderMismatchError, match="skips some characters"):
        encoder.encode_batch(["two words 42"])


# ---- when the fast path is refused ----------------------------------------------------------------


def tiny_json(tiny_dir) -> dict:
    return json.loads((tiny_dir / "tokenizer.json").read_text())


@pytest.mark.parametrize(("change", "reason"), [
    (lambda s: s.update(normalizer={"type": "NFC"}), "normalizer"),
    (lambda s: s["model"].update(ignore_merges=False), "ignore_merges is off"),
    (lambda s: s["model"].update(byte_fallback=True), "byte fallback"),
    (lambda s: s["model"]["merges"].pop(len(s["model"]["merges"]) // 2), "merges lack"),
    (lambda s: s["model"]["merges"].reverse(), "not ordered"),
    (lambda s: s["model"]["merges"].append(s["model"]["merges"][7]), "listed twice"),
    (lambda s: s["model"]["merges"].__setitem__(3, ["ÿ", "þ"]), "does not join"),
    (lambda s: s["added_tokens"].append({"id": 1024, "content": "<extra>", "special": False}), "not special"),
    (lambda s: s["pre_tokenizer"]["pretokenizers"][1].update(add_prefix_space=True), "prefix space"),
    (lambda s: s.update(pre_tokenizer={"type": "Whitespace"}), "Whitespace"),
])
def test_fast_path_refused_with_reason(tiny_dir, change, reason):
    spec = tiny_json(tiny_dir)
    plan, why = plan_fast_encoder(spec)
    assert plan is not None, why
    change(spec)
    plan, why = plan_fast_encoder(spec)
    assert plan is None and reason in why


def test_sentencepiece_folder_uses_hf_and_matches_sentencepiece(sp_dir):
    import sentencepiece as spm

    assert sorted(p.name for p in sp_dir.iterdir()) == ["tokenizer.model", "tokenizer_config.json"]
    tokenizer = load_tokenizer(sp_dir)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2)
    spec = select_encoder(tokenizer)
    assert spec.name == "hf" and "Metaspace" in spec.reason
    encoder, reference = spec.build()
    assert reference is None
    # HF's conversion prepends "▁" only when the text does not already start with a space (Metaspace
    # prepend_scheme=first), unlike sentencepiece; compare on texts that do not start with one.
    texts = [t for t in chinese_documents() + english_documents(20) + EDGE_CASES if not t[:1].isspace()]
    processor = spm.SentencePieceProcessor(model_file=str(sp_dir / "tokenizer.model"))
    for text, ids in zip(texts, encoder.encode_batch(texts), strict=True):
        assert ids.tolist() == processor.encode(text), repr(text[:80])
        assert decode(tokenizer, ids) == text


# ---- loading errors and the fingerprint -------------------------------------------------------------


def test_missing_tokenizer_folder(tmp_path):
    with pytest.raises(TokenizerError, match=f"tokenizer folder {tmp_path / 'nope'} does not exist"):
        load_tokenizer(tmp_path / "nope")


def test_folder_without_tokenizer_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(TokenizerError, match="holds no tokenizer.json"):
        load_tokenizer(tmp_path)


def test_corrupt_tokenizer_json(tiny_dir, tmp_path):
    (tmp_path / "tokenizer.json").write_text((tiny_dir / "tokenizer.json").read_text()[:1000])
    with pytest.raises(TokenizerError) as info:
        load_tokenizer(tmp_path)
    assert str(tmp_path / "tokenizer.json") in str(info.value) and "not valid JSON" in str(info.value)


def test_fingerprint_follows_tokenizer_files_only(tiny_dir, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    for file in tiny_dir.iterdir():
        (copy / file.name).write_bytes(file.read_bytes())
    (copy / "model.safetensors").write_bytes(b"weights are not part of the tokenizer")
    assert tokenizer_fingerprint(copy) == tokenizer_fingerprint(tiny_dir)
    config = json.loads((copy / "tokenizer_config.json").read_text())
    config["eos_token"] = BOS_TOKEN
    (copy / "tokenizer_config.json").write_text(json.dumps(config))
    assert tokenizer_fingerprint(copy) != tokenizer_fingerprint(tiny_dir)


# ---- read_tokenizer (no transformers) gives what load_tokenizer (AutoTokenizer) gives ------------------


def tiny_variant(tiny_dir: Path, folder: Path, *, config: dict | None = None, files: dict | None = None) -> Path:
    """A copy of the tiny tokenizer with tokenizer_config.json keys changed (None: removed) and files added."""
    shutil.copytree(tiny_dir, folder)
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    for key, value in (config or {}).items():
        if value is None:
            tokenizer_config.pop(key)
        else:
            tokenizer_config[key] = value
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    for name, content in (files or {}).items():
        (folder / name).write_text(json.dumps(content))
    return folder


def added_tokens_decoder(folder: Path) -> dict:
    """tokenizer_config.json's added_tokens_decoder as transformers writes it (LLaMA-3's has one)."""
    added = json.loads((folder / "tokenizer.json").read_text())["added_tokens"]
    return {str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in added}


# name -> (tokenizer_config.json changes, extra files, read without transformers?)
TINY_VARIANTS = {
    "as trained": ({}, {}, True),
    "no bos_token": ({"bos_token": None}, {}, True),
    "bos_token == eos_token": ({"bos_token": EOS_TOKEN}, {}, True),
    "added_tokens_decoder": ("decoder", {}, True),
    "class TokenizersBackend, chat template": (
        {"tokenizer_class": "TokenizersBackend", "chat_template": "{{ messages }}"}, {}, True),
    "special_tokens_map.json agreeing": (
        {}, {"special_tokens_map.json": {"bos_token": BOS_TOKEN, "eos_token": {"content": EOS_TOKEN}}}, True),
    # AutoTokenizer adds a missing pad token (len + 1): not a plain folder.
    "pad_token not in tokenizer.json": ({"pad_token": "<pad>"}, {}, False),
    "special_tokens_map.json disagreeing": ({}, {"special_tokens_map.json": {"bos_token": EOS_TOKEN}}, False),
    "add_bos_token": ({"add_bos_token": True}, {}, False),
    "model config.json": ({}, {"config.json": {"model_type": "llama"}}, False),
}


def assert_same_as_auto_tokenizer(folder: Path, read_with: str) -> None:
    info = read_tokenizer(folder)
    auto = tokenizer_info(load_tokenizer(folder), folder)
    assert info.read_with == read_with and auto.read_with == "AutoTokenizer"
    facts = ("path", "fingerprint", "class_name", "vocab_size", "bos_id", "eos_id")
    assert {f: getattr(info, f) for f in facts} == {f: getattr(auto, f) for f in facts}
    assert info.fingerprint == tokenizer_fingerprint(folder)
    tokenizer = load_tokenizer(folder)
    assert (info.vocab_size, info.bos_id, info.eos_id) == (len(tokenizer), tokenizer.bos_token_id,
                                                          tokenizer.eos_token_id)
    for prefer in ("auto", "hf"):
        ours, theirs = select_encoder(info, prefer), select_encoder(tokenizer, prefer)
        assert (ours.name, ours.reason, ours.fast_plan) == (theirs.name, theirs.reason, theirs.fast_plan)
    # Same ids from both JSONs (the file's, and AutoTokenizer's serialization of its backend).
    texts = multilingual_documents()[:20] + [IDENTITY_PROBE]
    ours, theirs = HFEncoder(info.tokenizer_json), HFEncoder(auto.tokenizer_json)
    for a, b in zip(ours.encode_batch(texts), theirs.encode_batch(texts), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("variant", list(TINY_VARIANTS))
def test_read_tokenizer_equals_auto_tokenizer_on_tiny_variants(tiny_dir, tmp_path, variant):
    config, files, plain = TINY_VARIANTS[variant]
    if config == "decoder":
        config = {"added_tokens_decoder": added_tokens_decoder(tiny_dir)}
    folder = tiny_variant(tiny_dir, tmp_path / "t", config=config, files=files)
    assert_same_as_auto_tokenizer(folder, "tokenizer.json" if plain else "AutoTokenizer")


@requires_llama3
def test_read_tokenizer_equals_auto_tokenizer_on_real_llama3():
    assert_same_as_auto_tokenizer(LLAMA3_TOKENIZER, "tokenizer.json")
    info = read_tokenizer(LLAMA3_TOKENIZER)
    assert (info.class_name, info.vocab_size, info.bos_id, info.eos_id) == ("TokenizersBackend", 128_256, 128_000,
                                                                           128_001)


def test_read_tokenizer_of_sentencepiece_folder_uses_auto_tokenizer(sp_dir):
    assert_same_as_auto_tokenizer(sp_dir, "AutoTokenizer")


def test_read_tokenizer_reports_corrupt_json_like_load_tokenizer(tiny_dir, tmp_path):
    (tmp_path / "tokenizer.json").write_text((tiny_dir / "tokenizer.json").read_text()[:1000])
    with pytest.raises(TokenizerError, match="not valid JSON") as info:
        read_tokenizer(tmp_path)
    assert str(tmp_path / "tokenizer.json") in str(info.value)


def test_fast_path_imports_neither_transformers_nor_torch(tiny_dir, tmp_path):
    """Packing with a plain tokenizer.json folder runs, main process and workers, with both imports broken."""
    for name in ("transformers", "torch"):
        (tmp_path / "blocker" / name).mkdir(parents=True)
        (tmp_path / "blocker" / name / "__init__.py").write_text(
            f"raise ImportError('{name} imported on the fast path')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "blocker")}
    blocked = subprocess.run([sys.executable, "-c", "import transformers"], capture_output=True, text=True, env=env)
    assert "transformers imported on the fast path" in blocked.stderr
    source = write_jsonl(tmp_path / "in.jsonl", english_documents(20) + chinese_documents())
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "pack_corpus.py"), "--input", str(source), "--tokenizer", str(tiny_dir),
         "--output", str(tmp_path / "c"), "--workers", "2", "--chunk-kb", "8", "--no-progress"],
        capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert "encoder         tiktoken" in result.stdout


# ---- the cached merges verdict ---------------------------------------------------------------------------


def test_merges_verdict_is_cached_and_equals_the_full_check(tiny_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("CPT_DS_CACHE_DIR", str(tmp_path / "cpt_ds"))
    text = (tiny_dir / "tokenizer.json").read_text()
    broken = json.loads(text)
    broken["model"]["merges"].pop(10)
    for tokenizer_json in (text, json.dumps(broken)):
        expected = plan_fast_encoder(json.loads(tokenizer_json))  # a dict: never cached
        assert plan_fast_encoder(tokenizer_json) == expected  # computed, stored
        with monkeypatch.context() as patch:
            patch.setattr(encoders_module, "merges_refusal", lambda *args: pytest.fail("cache not used"))
            assert plan_fast_encoder(tokenizer_json) == expected  # from the cache
    verdicts = json.loads((cache_dir() / MERGES_CACHE_NAME).read_text())["verdicts"]
    assert sorted(v is None for v in verdicts.values()) == [False, True]
    assert [p.name for p in cache_dir().iterdir()] == [MERGES_CACHE_NAME]  # no temporary file left


@pytest.mark.parametrize("content", [b"{\"version\": 1, \"verd", b"\xff\xfe garbage", b"[1, 2]",
                                     b'{"version": 1, "verdicts": {"abc": 42}}', b'{"version": 1}'])
def test_corrupt_merges_cache_is_ignored_and_rewritten(tiny_dir, monkeypatch, tmp_path, caplog, content):
    monkeypatch.setenv("CPT_DS_CACHE_DIR", str(tmp_path / "cpt_ds"))
    cache_file = cache_dir() / MERGES_CACHE_NAME
    cache_file.parent.mkdir(parents=True)
    cache_file.write_bytes(content)
    text = (tiny_dir / "tokenizer.json").read_text()
    with caplog.at_level(logging.WARNING, logger="cpt_ds.tokenizer"):
        plan, reason = plan_fast_encoder(text)
    assert plan is not None, reason
    rewritten = json.loads(cache_file.read_text())
    assert rewritten["version"] == encoders_module.MERGES_CACHE_VERSION
    assert list(rewritten["verdicts"].values()) == [None]
    if content != b"[1, 2]":  # not a cache at all, like one of another version: dropped silently
        assert "corrupt cache file" in caplog.text


def test_a_cached_verdict_of_another_version_is_not_used(tiny_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("CPT_DS_CACHE_DIR", str(tmp_path / "cpt_ds"))
    text = (tiny_dir / "tokenizer.json").read_text()
    digest = hashlib.sha256(text.encode()).hexdigest()
    cache_file = cache_dir() / MERGES_CACHE_NAME
    cache_file.parent.mkdir(parents=True)
    cache_file.write_text(json.dumps({"version": 0, "verdicts": {digest: "stale verdict"}}))
    assert plan_fast_encoder(text)[0] is not None


def test_unwritable_cache_only_costs_time(tiny_dir, monkeypatch, tmp_path, caplog):
    (tmp_path / "not_a_folder").write_text("x")
    monkeypatch.setenv("CPT_DS_CACHE_DIR", str(tmp_path / "not_a_folder" / "cpt_ds"))
    text = (tiny_dir / "tokenizer.json").read_text()
    with caplog.at_level(logging.WARNING, logger="cpt_ds.tokenizer"):
        assert plan_fast_encoder(text) == plan_fast_encoder(json.loads(text))
    assert "cannot write the cache file" in caplog.text
