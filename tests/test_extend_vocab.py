"""tools/extend_vocab.py: a BPE continuation that keeps every original id and the exact fast encoder.

The tiny LLaMA-3-shaped tokenizer (1,024 ids) is extended on the Chinese test documents; the real
LLaMA-3 tokenizer is used by one optional test where it is present.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from cpt_ds.pack.bpe import BpeContinuation
from cpt_ds.pack.encoders import check_identity, select_encoder
from cpt_ds.pack.extend_vocab import (
    REPORT_FILE,
    ExtendOptions,
    VocabExtensionError,
    extend_vocabulary,
    read_base_tokenizer,
)
from cpt_ds.tokenizer import VOCAB_EXTENSION_FILE, read_tokenizer

from helpers_data import (
    EDGE_CASES,
    LLAMA3_TOKENIZER,
    REPO,
    chinese_documents,
    english_documents,
    multilingual_documents,
    requires_llama3,
)

TOOL = REPO / "tools" / "extend_vocab.py"
NUM_NEW = 300


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def domain_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("domain") / "zh.jsonl", chinese_documents())


@pytest.fixture(scope="module")
def extended(tiny_dir, domain_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("extended") / "tokenizer"
    extend_vocabulary(tiny_dir, [domain_file], out, ExtendOptions(num_new_tokens=NUM_NEW, eval_fraction=0.2))
    return out


def hf(folder: Path):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.encode_special_tokens = True  # as the packer encodes: special-token strings are text
    return tokenizer


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False).ids


def test_every_original_id_special_token_and_config_is_kept(tiny_dir, extended):
    from transformers import AutoTokenizer

    before = json.loads((tiny_dir / "tokenizer.json").read_text(encoding="utf-8"))
    after = json.loads((extended / "tokenizer.json").read_text(encoding="utf-8"))
    old_vocab, new_vocab = before["model"]["vocab"], after["model"]["vocab"]
    assert all(new_vocab[token] == token_id for token, token_id in old_vocab.items())
    new_ids = sorted(set(new_vocab.values()) - set(old_vocab.values()) - {t["id"] for t in before["added_tokens"]})
    assert new_ids == list(range(1024, 1024 + NUM_NEW))  # after BOS 1022 / EOS 1023
    assert after["added_tokens"] == before["added_tokens"]
    # Original merges keep their order; every added merge involves a new token.
    merges_before = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in before["model"]["merges"]]
    merges_after = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in after["model"]["merges"]]
    old_set = set(merges_before)
    assert [m for m in merges_after if m in old_set] == merges_before
    assert all(new_vocab[left] >= 1024 or new_vocab[right] >= 1024 or new_vocab[left + right] >= 1024
               for left, right in merges_after if (left, right) not in old_set)
    for name in ("pre_tokenizer", "decoder", "post_processor", "normalizer"):
        assert after[name] == before[name]
    assert (extended / "tokenizer_config.json").read_bytes() == (tiny_dir / "tokenizer_config.json").read_bytes()
    old_tok, new_tok = AutoTokenizer.from_pretrained(tiny_dir), AutoTokenizer.from_pretrained(extended)
    assert len(new_tok) == len(old_tok) + NUM_NEW
    assert (new_tok.bos_token_id, new_tok.eos_token_id) == (old_tok.bos_token_id, old_tok.eos_token_id) == (1022, 1023)
    assert new_tok.convert_ids_to_tokens([1022, 1023]) == ["<|begin_of_text|>", "<|end_of_text|>"]


def test_text_without_new_merges_tokenizes_identically(tiny_dir, extended):
    """Piece by piece (BPE never crosses a piece): a piece without a new id has exactly its old ids."""
    old, new = hf(tiny_dir), hf(extended)
    num_same = num_changed = 0
    for text in multilingual_documents():
        for piece, _ in old.pre_tokenizer.pre_tokenize_str(text):
            before = [t.id for t in old.model.tokenize(piece)]
            after = [t.id for t in new.model.tokenize(piece)]
            if all(i < 1024 for i in after):
                assert after == before, piece
                num_same += 1
            else:
                assert len(after) < len(before), piece
                num_changed += 1
    assert num_same > 1000 and num_changed > 100
    for text in english_documents(10) + EDGE_CASES:
        if all(i < 1024 for i in ids(new, text)):
            assert ids(new, text) == ids(old, text)


def test_learning_state_is_what_the_written_tokenizer_gives(tiny_dir, extended, domain_file):
    """The BPE loop's token counts are counts of the real extended tokenizer's tokens, piece by piece."""
    from cpt_ds.pack.pieces import count_pieces

    options = ExtendOptions(num_new_tokens=NUM_NEW, eval_fraction=0.2)
    base = read_base_tokenizer(tiny_dir)
    counts = count_pieces([domain_file], json.dumps(base.spec), options)
    bpe = BpeContinuation(base)
    bpe.load_pieces(counts.train)
    bpe.train(NUM_NEW, options.min_frequency)
    model = hf(extended).model
    assert [[t.id for t in model.tokenize(piece)] for piece in bpe.texts] == bpe.pieces


def test_fast_encoder_is_proven_identical_on_the_extended_tokenizer(extended, tmp_path, caplog):
    from cpt_ds.pack.packing import PackOptions, pack_corpus
    from cpt_ds.token_file import IndexedTokenFile

    spec = select_encoder(read_tokenizer(extended))
    assert spec.name == "tiktoken", spec.reason
    encoder, reference = spec.build()  # proves itself on the identity probe
    texts = multilingual_documents()
    assert check_identity(texts, encoder.encode_batch(texts), reference) > 10_000
    with caplog.at_level(logging.INFO):
        pack_corpus([write_jsonl(tmp_path / "docs.jsonl", texts)], extended, tmp_path / "packed", PackOptions(),
                    workers=1)
    assert "encoder: tiktoken" in caplog.text
    token_file = IndexedTokenFile(tmp_path / "packed")
    assert token_file.meta["encoder"] == "tiktoken" and token_file.meta["vocab_size"] == 1024 + NUM_NEW
    assert token_file.meta["max_token_id"] >= 1024  # the new tokens are used


def test_round_trip_with_auto_tokenizer(extended, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(extended)
    tokenizer.save_pretrained(tmp_path / "saved")
    again = AutoTokenizer.from_pretrained(tmp_path / "saved")
    for text in multilingual_documents():
        encoded = tokenizer.encode(text, add_special_tokens=False)
        assert again.encode(text, add_special_tokens=False) == encoded
        assert tokenizer.decode(encoded, skip_special_tokens=False, clean_up_tokenization_spaces=False) == text
    assert again.decode([1022]) == "<|begin_of_text|>"


def test_report_and_record(tiny_dir, extended):
    report = json.loads((extended / REPORT_FILE).read_text(encoding="utf-8"))
    record = json.loads((extended / VOCAB_EXTENSION_FILE).read_text(encoding="utf-8"))
    held_out = report["eval"]["all"]
    assert held_out["num_documents"] > 0 and report["train"]["num_documents"] > 0
    assert held_out["num_documents"] + report["train"]["num_documents"] == len(chinese_documents())
    assert report["eval"]["cjk_dominant"]["token_reduction"] > 0.1
    assert report["fast_encoder"] == "tiktoken" and report["num_new_tokens"] == NUM_NEW
    assert report["top_new_tokens"][0]["count"] >= report["top_new_tokens"][-1]["count"] >= 2
    # The record ties the new rows to the base tokenizer: its fingerprint and each token's sub-tokens.
    from cpt_ds.tokenizer import tokenizer_fingerprint

    assert record["base_tokenizer"]["fingerprint"] == tokenizer_fingerprint(tiny_dir)
    assert record["base_tokenizer"]["num_ids"] == 1024 and record["first_new_id"] == 1024
    old = hf(tiny_dir)
    for token in record["new_tokens"]:
        assert token["sub_token_ids"] == [t.id for t in old.model.tokenize(token["token"])]
        assert len(token["sub_token_ids"]) >= 2 and max(token["sub_token_ids"]) < 1022


def test_rank_ordered_merges_are_appended(tmp_path, domain_file):
    """A GPT-2-style byte-level BPE (merges in learned order, not tiktoken form) is extended too."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(english_documents(60), trainers.BpeTrainer(
        vocab_size=600, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"]))
    base = tmp_path / "gpt2"
    base.mkdir()
    tokenizer.save(str(base / "tokenizer.json"))
    assert read_base_tokenizer(base).merge_form == "ranked"
    out = tmp_path / "out"
    extend_vocabulary(base, [domain_file], out, ExtendOptions(num_new_tokens=50, eval_fraction=0.0))
    old, new = hf(base), hf(out)
    for text in multilingual_documents():
        after = ids(new, text)
        assert new.decode(after) == old.decode(ids(old, text))
        if all(i < 600 for i in after):
            assert after == ids(old, text)
    assert len(ids(new, chinese_documents()[0])) < len(ids(old, chinese_documents()[0]))


def test_workers_give_the_same_tokenizer(tiny_dir, domain_file, extended, tmp_path):
    out = tmp_path / "two_workers"
    extend_vocabulary(tiny_dir, [domain_file], out, ExtendOptions(num_new_tokens=NUM_NEW, eval_fraction=0.2),
                      workers=2)
    for name in ("tokenizer.json", VOCAB_EXTENSION_FILE):
        assert (out / name).read_bytes() == (extended / name).read_bytes()


# ---- bad inputs: one clear error each, nothing written ----------------------------------------------


def run_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), "--no-progress", *args], capture_output=True, text=True,
                          timeout=120)


def test_cli_runs_and_prints_the_report(tiny_dir, domain_file, tmp_path):
    done = run_tool("--tokenizer", str(tiny_dir), "--input", str(domain_file), "--num-new-tokens", "20",
                    "--output", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    assert "with 20 new tokens" in done.stdout and "cjk_dominant" in done.stdout
    assert (tmp_path / "out" / "tokenizer.json").is_file()


@pytest.mark.parametrize("case", ["no_text", "zero_tokens", "negative_tokens", "not_byte_level", "output_exists"])
def test_bad_input_gives_one_clear_error_and_writes_nothing(case, tiny_dir, domain_file, tmp_path):
    from helpers_data import train_sentencepiece_tokenizer

    tokenizer, inputs, num, out = str(tiny_dir), [str(domain_file)], "10", tmp_path / "out"
    expected = {"no_text": "no text to learn from", "zero_tokens": "--num-new-tokens must be positive, got 0",
                "negative_tokens": "--num-new-tokens must be positive, got -5",
                "not_byte_level": "is not a byte-level BPE", "output_exists": "exists already"}[case]
    if case == "no_text":
        empty = tmp_path / "empty.txt"
        empty.write_text("\n   \n\t\n", encoding="utf-8")
        inputs = [str(empty)]
    elif case == "zero_tokens":
        num = "0"
    elif case == "negative_tokens":
        num = "-5"
    elif case == "not_byte_level":
        from transformers import AutoTokenizer

        # A sentencepiece (LLaMA-2 style) tokenizer, as transformers converts it to a tokenizer.json.
        spm = train_sentencepiece_tokenizer(tmp_path / "spm")
        AutoTokenizer.from_pretrained(spm).save_pretrained(tmp_path / "spm_json")
        tokenizer = str(tmp_path / "spm_json")
    elif case == "output_exists":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    done = run_tool("--tokenizer", tokenizer, "--input", *inputs, "--num-new-tokens", num, "--output", str(out))
    assert done.returncode == 2, (done.stdout, done.stderr)
    errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and expected in errors[0], done.stderr
    assert "Traceback" not in done.stderr
    if case == "output_exists":
        assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    else:
        assert not out.exists()
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_an_extended_tokenizer_is_not_extended_again(extended, domain_file, tmp_path):
    with pytest.raises(VocabExtensionError, match="extended already"):
        extend_vocabulary(extended, [domain_file], tmp_path / "again", ExtendOptions(num_new_tokens=5))


# ---- the real LLaMA-3 tokenizer (optional) -------------------------------------------------------


@requires_llama3
def test_llama3_extension_keeps_ids_and_the_fast_encoder(domain_file, tmp_path):
    out = tmp_path / "llama3_zh"
    result = extend_vocabulary(LLAMA3_TOKENIZER, [domain_file], out,
                               ExtendOptions(num_new_tokens=200, eval_fraction=0.2))
    assert result.report["first_new_id"] == 128_256 and result.report["fast_encoder"] == "tiktoken"
    info = read_tokenizer(out)
    assert info.vocab_size == 128_256 + 200 and (info.bos_id, info.eos_id) == (128_000, 128_001)
    assert info.read_with == "tokenizer.json"  # still a plain folder: the packer reads it without transformers
    spec = select_encoder(info)
    assert spec.name == "tiktoken", spec.reason
    encoder, reference = spec.build()
    texts = multilingual_documents()
    check_identity(texts, encoder.encode_batch(texts), reference)
    old = hf(LLAMA3_TOKENIZER)
    new = reference._tokenizer
    for text in english_documents(20) + EDGE_CASES:
        after = ids(new, text)
        if all(i < 128_256 for i in after):
            assert after == ids(old, text)
    assert result.report["eval"]["cjk_dominant"]["token_reduction"] > 0.03
