"""Grow a byte-level BPE tokenizer (LLaMA-3) with a domain vocabulary by continuing its BPE.

The new tokens are learned from the tokenizer's *own* tokenization of the domain text, so nothing it
already does changes:

1. Every document is cut by the tokenizer's own pre-tokenizer (``tokenizers``' ``pre_tokenize_str``:
   LLaMA-3's split regex, then the byte-level mapping) into pieces; BPE never merges across pieces.
   Pieces are counted (memory grows with the distinct pieces, not with the corpus), each distinct
   piece is encoded once by the original BPE model, and its ids are the starting state.
2. Then classic BPE training continues on that state (the pair-count loop of ``tokenizers``'
   ``BpeTrainer``): count adjacent id pairs weighted by piece frequency, turn the most frequent pair
   (ties: the smaller ids) into a new token with the next id after the last existing one (LLaMA-3:
   128,256, past the special tokens), and update only the pieces that held the pair.
3. After each new token every touched piece is brought to what the extended tokenizer will really
   give for it, not just "the pair joined": the merge rules may let the new token join a
   neighbour into an *existing* token, and a piece that is now a whole token is taken whole
   (``ignore_merges``). The learned counts are therefore counts of the final tokenizer's tokens.

Step 1 lives in ``cpt_ds/pack/pieces.py``; steps 2 and 3, and how the new merges are written
(keeping LLaMA-3's tiktoken form, so the packer's exact encoder still applies), in
``cpt_ds/pack/bpe.py``. This module checks the base tokenizer and writes the output folder.

The output folder holds ``tokenizer.json`` (original vocabulary, added tokens, pre-tokenizer,
decoder and post-processor unchanged; new tokens and merges appended), ``tokenizer_config.json`` and
``special_tokens_map.json`` copied byte for byte (special tokens and chat template unchanged),
``cpt_ds_vocab_extension.json`` (the base tokenizer's fingerprint and each new token's sub-tokens
under it, for the model's embedding init) and ``extend_report.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cpt_ds import __version__
from cpt_ds.pack.bpe import BaseTokenizer, BpeContinuation, MergeForm, extended_spec, token_bytes
from cpt_ds.pack.encoders import byte_level_alphabet, cached_merges_refusal
from cpt_ds.pack.pieces import PieceCounts, count_pieces, measure
from cpt_ds.pack.sources import EncodingErrors, PackError, TxtUnit
from cpt_ds.tokenizer import (
    EXTENSION_FORMAT,
    EXTENSION_VERSION,
    TOKENIZER_FILE_NAMES,
    VOCAB_EXTENSION_FILE,
    TokenizerError,
    _read_json_file,
    tokenizer_files,
    tokenizer_fingerprint,
)

logger = logging.getLogger(__name__)

REPORT_FILE = "extend_report.json"
# Files copied unchanged into the output; any other tokenizer file of the base (vocab.json,
# merges.txt, tokenizer.model...) would describe the old vocabulary and is left out.
COPIED_FILES = ("tokenizer_config.json", "special_tokens_map.json")
CHUNK_BYTES = 4 << 20


class VocabExtensionError(ValueError):
    """Bad input to the vocabulary extension; the message names the problem and the fix."""


@dataclass(frozen=True, kw_only=True)
class ExtendOptions:
    num_new_tokens: int
    """How many tokens to add (fewer when the text has fewer pairs seen ``min_frequency`` times)."""
    min_frequency: int = 2
    """A pair seen fewer times in the training documents is never made a token."""
    eval_fraction: float = 0.05
    """Share of whole documents held out (by a hash of their text) for the report."""
    txt_unit: TxtUnit = "line"
    json_key: str = "text"
    encoding_errors: EncodingErrors = "strict"
    num_top_tokens: int = 50
    """How many of the most frequent new tokens the report lists."""

    def __post_init__(self) -> None:
        rules = [
            (self.num_new_tokens > 0, f"--num-new-tokens must be positive, got {self.num_new_tokens}"),
            (self.min_frequency >= 1, f"--min-frequency must be at least 1, got {self.min_frequency}"),
            (0.0 <= self.eval_fraction < 1.0, f"--eval-fraction must be in [0, 1), got {self.eval_fraction}"),
        ]
        problems = [message for holds, message in rules if not holds]
        if problems:
            raise VocabExtensionError("; ".join(problems))


# --------------------------------------------------------------------------------------------------
# The base tokenizer
# --------------------------------------------------------------------------------------------------



def read_base_tokenizer(folder: str | os.PathLike) -> BaseTokenizer:
    """Read ``folder``'s ``tokenizer.json``; one ``VocabExtensionError`` if it is not a byte-level BPE."""
    folder = Path(folder)
    try:
        tokenizer_files(folder)
    except TokenizerError as error:
        raise VocabExtensionError(str(error)) from None
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise VocabExtensionError(f"tokenizer folder {folder} has no tokenizer.json; only byte-level BPE "
                                  "tokenizers (LLaMA-3, GPT-2 style) can be extended")
    data, json_text, spec = _read_json_file(path)
    model = spec.get("model") or {}
    problems = []
    if model.get("type") != "BPE":
        problems.append(f"its model is {model.get('type')}, not BPE")
    else:
        if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
            problems.append("it uses subword prefixes/suffixes")
        if model.get("byte_fallback"):
            problems.append("it uses byte fallback (a sentencepiece-style BPE)")
        if model.get("dropout"):
            problems.append("BPE dropout is on")
        if spec.get("normalizer") is not None:
            problems.append(f"a {spec['normalizer'].get('type')} normalizer rewrites the text")
        if not _has_byte_level_step(spec.get("pre_tokenizer")):
            problems.append("its pre-tokenizer has no byte-level step")
        vocab = model.get("vocab") or {}
        if not all(c in vocab for c in byte_level_alphabet().values()):
            problems.append("its vocabulary lacks some of the 256 byte tokens")
    if problems:
        raise VocabExtensionError(f"tokenizer {folder} is not a byte-level BPE ({'; '.join(problems)}); "
                                  "only byte-level BPE tokenizers such as LLaMA-3's can be extended by "
                                  "tools/extend_vocab.py")
    if (folder / VOCAB_EXTENSION_FILE).is_file():
        raise VocabExtensionError(f"tokenizer {folder} was extended already ({VOCAB_EXTENSION_FILE}); extend "
                                  "the original tokenizer once with all the domain text instead")
    vocab = dict(model["vocab"])
    raw_merges = model.get("merges") or []
    merges_as_strings = not raw_merges or isinstance(raw_merges[0], str)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in raw_merges]
    added = {token["content"]: token["id"] for token in spec.get("added_tokens", [])}
    all_ids = list(vocab.values()) + list(added.values())
    json_sha256 = hashlib.sha256(data).hexdigest()
    # Cached per tokenizer.json like the packer's verdict (~0.5 s for LLaMA-3).
    form: MergeForm = "tiktoken" if cached_merges_refusal(vocab, merges, json_sha256) is None else "ranked"
    return BaseTokenizer(folder=folder, spec=spec, fingerprint=tokenizer_fingerprint(folder), merge_form=form,
                         vocab=vocab, merges=merges, merges_as_strings=merges_as_strings, added=added,
                         num_ids=len(vocab.keys() | added.keys()), first_new_id=max(all_ids) + 1,
                         json_text=json_text, json_sha256=json_sha256)


def _has_byte_level_step(pre_tokenizer: dict[str, Any] | None) -> bool:
    if pre_tokenizer is None:
        return False
    steps = pre_tokenizer["pretokenizers"] if pre_tokenizer.get("type") == "Sequence" else [pre_tokenizer]
    return any(step.get("type") == "ByteLevel" for step in steps)


@dataclass
class ExtendResult:
    output: Path
    report: dict[str, Any]

    def format(self) -> str:
        report = self.report
        lines = [f"extended {report['base_tokenizer']['path']} ({report['base_tokenizer']['num_ids']:,} ids) with "
                 f"{report['num_new_tokens']:,} new tokens (ids {report['first_new_id']:,}.."
                 f"{report['first_new_id'] + report['num_new_tokens'] - 1:,}) -> {self.output}",
                 f"learned from {report['train']['num_documents']:,} documents ({report['train']['num_chars']:,} "
                 f"characters, {report['train']['num_distinct_pieces']:,} distinct pieces) in "
                 f"{report['seconds']:.1f} s; fast encoder: {report['fast_encoder']}"]
        lines.append("held-out documents   | docs | characters | tokens/char before | after | fewer tokens")
        for name in ("all", "cjk_dominant"):
            row = report["eval"][name]
            if row["num_chars"] == 0:
                lines.append(f"{name:<20} | none held out")
                continue
            lines.append(f"{name:<20} | {row['num_documents']:,} | {row['num_chars']:,} | "
                         f"{row['tokens_per_char_before']:.3f} | {row['tokens_per_char_after']:.3f} | "
                         f"{100 * row['token_reduction']:.1f}%")
        top = ", ".join(f"{t['text']!r} ({t['count']:,})" for t in report["top_new_tokens"][:15])
        lines.append(f"most frequent new tokens: {top}")
        return "\n".join(lines)


def extend_vocabulary(tokenizer: str | os.PathLike, inputs: Sequence[str | os.PathLike], output: str | os.PathLike,
                      options: ExtendOptions, *, workers: int = 1, progress: bool = False) -> ExtendResult:
    """Learn ``options.num_new_tokens`` tokens on ``inputs`` and write the extended tokenizer to ``output``.

    Written into a temporary folder beside ``output`` and renamed when complete: an error or an
    interrupt leaves no ``output``. ``output`` must not exist.
    """
    start = time.perf_counter()
    output = Path(output)
    if output.exists():
        raise VocabExtensionError(f"output {output} exists already; choose a new --output folder "
                                  "(nothing is overwritten)")
    base = read_base_tokenizer(tokenizer)
    _refuse_whole_special_tokens(base)
    counts, bpe = _learn(base, inputs, options, workers=workers, progress=progress)
    spec = extended_spec(base, bpe)
    spec_text = json.dumps(spec, ensure_ascii=False, indent=2) + "\n"

    from tokenizers import Tokenizer

    from cpt_ds.pack.encoders import plan_fast_encoder

    new_tokens, top = _new_tokens(base, bpe, options.num_top_tokens)
    # Under the sha256 of the file written, so the packer finds this verdict in its cache.
    plan, reason = plan_fast_encoder(spec, json_sha256=hashlib.sha256(spec_text.encode("utf-8")).hexdigest())
    fast = "tiktoken" if plan is not None else f"none ({reason})"
    base_info = {"path": str(base.folder), "fingerprint": base.fingerprint, "num_ids": base.num_ids,
                 "merge_form": base.merge_form}
    record = {"format": EXTENSION_FORMAT, "version": EXTENSION_VERSION, "tool_version": __version__,
              "base_tokenizer": base_info, "first_new_id": base.first_new_id, "num_new_tokens": len(new_tokens),
              "options": asdict(options), "new_tokens": new_tokens}
    report = {"base_tokenizer": base_info, "first_new_id": base.first_new_id, "num_new_tokens": len(new_tokens),
              "num_new_tokens_asked": options.num_new_tokens, "num_added_merges": len(bpe.extra_merges),
              "options": asdict(options), "fast_encoder": fast,
              "train": {"num_documents": counts.num_train_documents, "num_chars": counts.num_train_chars,
                        "num_distinct_pieces": len(counts.train), "num_empty_skipped": counts.num_empty},
              "eval": measure(base.hf.model, Tokenizer.from_str(spec_text).model, counts), "top_new_tokens": top}
    _write_folder(output, base, spec_text, record, report, start)
    return ExtendResult(output, report)


def _refuse_whole_special_tokens(base: BaseTokenizer) -> None:
    for content in base.added:
        # Special tokens join the BPE vocabulary (see ``extended_spec``); one that the pre-tokenizer
        # leaves whole would then be taken whole from plain text (``ignore_merges``).
        if [piece for piece, _ in base.hf.pre_tokenizer.pre_tokenize_str(content)] == [content]:
            raise VocabExtensionError(f"special token {content!r} of {base.folder} is one whole pre-tokenizer "
                                      "piece, so plain text could turn into it once it is in the vocabulary; "
                                      "this tokenizer cannot be extended by tools/extend_vocab.py")


def _learn(base: BaseTokenizer, inputs: Sequence[str | os.PathLike], options: ExtendOptions, *, workers: int,
           progress: bool) -> tuple[PieceCounts, BpeContinuation]:
    """Count the inputs' pieces and continue the base BPE on the training ones."""
    try:
        counts = count_pieces(inputs, base.json_text, options, workers=workers, progress=progress,
                              pre_tokenizer=base.hf.pre_tokenizer)
    except PackError as error:
        raise VocabExtensionError(str(error)) from None
    if counts.num_train_documents == 0:
        held = f" ({counts.num_eval_documents} held out by --eval-fraction)" if counts.num_eval_documents else ""
        raise VocabExtensionError(f"the inputs hold no text to learn from{held}; pass non-empty documents "
                                  "(check --txt-unit / --json-key)")
    bpe = BpeContinuation(base)
    bpe.load_pieces(counts.train, progress=progress)
    bpe.train(options.num_new_tokens, options.min_frequency, progress=progress)
    if not bpe.new_ids:
        raise VocabExtensionError(f"no pair of tokens occurs {options.min_frequency} times in the training "
                                  "documents, so no token was learned; pass more text or lower --min-frequency")
    if len(bpe.new_ids) < options.num_new_tokens:
        logger.warning("learned %d of %d tokens: no other pair occurs --min-frequency %d times",
                       len(bpe.new_ids), options.num_new_tokens, options.min_frequency)
    return counts, bpe


def _new_tokens(base: BaseTokenizer, bpe: BpeContinuation,
                num_top: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Each new token with its base sub-tokens (the record), and the ``num_top`` most frequent (the report)."""
    base_model = base.hf.model
    new_tokens = [{"id": token_id, "token": bpe.token_of[token_id],
                   "text": token_bytes(bpe.token_of[token_id]).decode("utf-8", "replace"),  # type: ignore[arg-type]
                   "sub_token_ids": [t.id for t in base_model.tokenize(bpe.token_of[token_id])]}
                  for token_id in bpe.new_ids]
    frequency: Counter[int] = Counter()
    for ids, count in zip(bpe.pieces, bpe.counts, strict=True):
        for token_id in ids:
            if token_id >= base.first_new_id:
                frequency[token_id] += count
    ranked = sorted(frequency.items(), key=lambda item: (-item[1], item[0]))[:num_top]
    top = [{"id": token_id, "text": new_tokens[token_id - base.first_new_id]["text"], "count": count}
           for token_id, count in ranked]
    return new_tokens, top


def _write_folder(output: Path, base: BaseTokenizer, spec_text: str, record: dict[str, Any],
                  report: dict[str, Any], start: float) -> None:
    """Write the extended tokenizer folder beside ``output`` and rename it into place when complete."""
    temporary = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    if temporary.exists():
        shutil.rmtree(temporary)
    temporary.mkdir(parents=True)
    try:
        (temporary / "tokenizer.json").write_text(spec_text, encoding="utf-8")
        for name in COPIED_FILES:
            if (base.folder / name).is_file():
                shutil.copy2(base.folder / name, temporary / name)
        left_out = [f.name for f in tokenizer_files(base.folder)
                    if f.name not in COPIED_FILES + ("tokenizer.json",) and f.name in TOKENIZER_FILE_NAMES]
        if left_out:
            logger.warning("not copied (they describe the old vocabulary): %s", ", ".join(left_out))
        (temporary / VOCAB_EXTENSION_FILE).write_text(json.dumps(record, ensure_ascii=False, indent=1) + "\n",
                                                      encoding="utf-8")
        report["seconds"] = time.perf_counter() - start
        (temporary / REPORT_FILE).write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        os.rename(temporary, output)  # fails rather than replace an output made meanwhile
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
