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
   give for it, not just "the pair joined": the merge rules below may let the new token join a
   neighbour into an *existing* token, and a piece that is now a whole token is taken whole
   (``ignore_merges``). The learned counts are therefore counts of the final tokenizer's tokens.

How the merges are written depends on the base tokenizer's merge list:

* ``tiktoken`` form (LLaMA-3; Hugging Face's tiktoken converter writes it): the merges are every
  split of every token into two tokens, ordered by the id of the token formed, and a merge's rank is
  the id it forms. The extension keeps that form, so the packer's exact tiktoken encoder still
  applies: each new token gets every split of it into two tokens (ranked after every original merge,
  since its id is larger), and the rare split of an *original* token whose one half is a new token is
  inserted after that original token's own merges (tiktoken makes that merge anyway; without it HF
  ``tokenizers`` would not). No original merge moves, and every added merge has a new token on one
  side or the other, so a text in which no new merge applies tokenizes exactly as before.
* Rank-ordered merges (GPT-2 style): the learned merges are appended after the original ones.

The output folder holds ``tokenizer.json`` (original vocabulary, added tokens, pre-tokenizer,
decoder and post-processor unchanged; new tokens and merges appended), ``tokenizer_config.json`` and
``special_tokens_map.json`` copied byte for byte (special tokens and chat template unchanged),
``cpt_ds_vocab_extension.json`` (the base tokenizer's fingerprint and each new token's sub-tokens
under it, for the model's embedding init) and ``extend_report.json``.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import logging
import os
import shutil
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Literal

from cpt_ds import __version__
from cpt_ds.pack.encoders import byte_level_alphabet, cached_merges_refusal
from cpt_ds.pack.chunks import RawChunk, iter_raw_chunks
from cpt_ds.pack.documents import chunk_documents
from cpt_ds.pack.sources import EncodingErrors, PackError, TxtUnit, discover_inputs
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
MergeForm = Literal["tiktoken", "ranked"]


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
        problems = []
        if self.num_new_tokens <= 0:
            problems.append(f"--num-new-tokens must be positive, got {self.num_new_tokens}")
        if self.min_frequency < 1:
            problems.append(f"--min-frequency must be at least 1, got {self.min_frequency}")
        if not 0.0 <= self.eval_fraction < 1.0:
            problems.append(f"--eval-fraction must be in [0, 1), got {self.eval_fraction}")
        if problems:
            raise VocabExtensionError("; ".join(problems))


# --------------------------------------------------------------------------------------------------
# The base tokenizer
# --------------------------------------------------------------------------------------------------


@dataclass
class BaseTokenizer:
    """A byte-level BPE ``tokenizer.json`` and what the extension needs from it."""

    folder: Path
    spec: dict[str, Any]
    fingerprint: str
    merge_form: MergeForm
    vocab: dict[str, int]
    merges: list[tuple[str, str]]
    merges_as_strings: bool
    """The file writes merges as ``"a b"`` strings (else as ``["a", "b"]`` lists); kept as found."""
    added: dict[str, int]
    num_ids: int
    """``len(tokenizer)``: distinct vocabulary and added-token texts (LLaMA-3: 128,256)."""
    first_new_id: int
    json_text: str
    json_sha256: str
    _hf: Any = None

    @property
    def hf(self) -> Any:
        """The base ``tokenizers.Tokenizer`` (built once: ~0.6 s for LLaMA-3)."""
        if self._hf is None:
            from tokenizers import Tokenizer

            self._hf = Tokenizer.from_str(self.json_text)
        return self._hf


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


def token_bytes(token: str) -> bytes:
    """The bytes a byte-level token stands for (``Ġ`` = a space)."""
    return bytes(_UNICODE_TO_BYTE[c] for c in token)


_UNICODE_TO_BYTE = {c: b for b, c in byte_level_alphabet().items()}


# --------------------------------------------------------------------------------------------------
# Counting pieces (workers)
# --------------------------------------------------------------------------------------------------


def is_cjk_dominant(text: str) -> bool:
    """At least half of the non-space characters are Han, kana or Hangul (Chinese/Japanese/Korean)."""
    num_cjk = num_other = 0
    for char in text:
        if char.isspace():
            continue
        if _is_cjk(char):
            num_cjk += 1
        else:
            num_other += 1
    return num_cjk > 0 and num_cjk >= num_other


def _is_cjk(char: str) -> bool:
    code = ord(char)
    return (0x4E00 <= code <= 0x9FFF or 0x3400 <= code <= 0x4DBF or 0x20000 <= code <= 0x3134F
            or 0xF900 <= code <= 0xFAFF or 0x3040 <= code <= 0x30FF or 0xAC00 <= code <= 0xD7AF
            or 0x1100 <= code <= 0x11FF or 0x3130 <= code <= 0x318F or 0x31F0 <= code <= 0x31FF)


def is_held_out(text: str, fraction: float) -> bool:
    """Whether document ``text`` is held out: by a hash of its text, so neither chunking, workers, file
    names nor order matter, and copies of one document always fall on the same side."""
    if fraction <= 0:
        return False
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") < fraction * 2**64


@dataclass
class PieceCounts:
    """Piece frequencies of the training documents and of the held-out ones (all, and CJK-dominant)."""

    train: Counter[str] = field(default_factory=Counter)
    eval_all: Counter[str] = field(default_factory=Counter)
    eval_cjk: Counter[str] = field(default_factory=Counter)
    num_train_documents: int = 0
    num_train_chars: int = 0
    num_eval_documents: int = 0
    num_eval_chars: int = 0
    num_eval_cjk_documents: int = 0
    num_eval_cjk_chars: int = 0
    num_empty: int = 0
    num_raw_bytes: int = 0

    def add(self, other: PieceCounts) -> None:
        for name, value in vars(other).items():
            if isinstance(value, Counter):
                getattr(self, name).update(value)
            else:
                setattr(self, name, getattr(self, name) + value)


_pre_tokenizer: Any = None
_worker_options: ExtendOptions | None = None


def _init_counter(tokenizer_json: str, options: ExtendOptions) -> None:
    global _pre_tokenizer, _worker_options
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer

    _pre_tokenizer = Tokenizer.from_str(tokenizer_json).pre_tokenizer
    _worker_options = options


def _count_chunk(chunk: RawChunk) -> PieceCounts:
    assert _pre_tokenizer is not None and _worker_options is not None, "worker not initialised"
    options = _worker_options
    documents = chunk_documents(chunk, json_key=options.json_key, encoding_errors=options.encoding_errors)
    counts = PieceCounts(num_empty=documents.num_empty, num_raw_bytes=chunk.num_raw_bytes)
    split = _pre_tokenizer.pre_tokenize_str
    for text in documents.texts:
        pieces = [piece for piece, _ in split(text)]
        if is_held_out(text, options.eval_fraction):
            counts.num_eval_documents += 1
            counts.num_eval_chars += len(text)
            counts.eval_all.update(pieces)
            if is_cjk_dominant(text):
                counts.num_eval_cjk_documents += 1
                counts.num_eval_cjk_chars += len(text)
                counts.eval_cjk.update(pieces)
        else:
            counts.num_train_documents += 1
            counts.num_train_chars += len(text)
            counts.train.update(pieces)
    return counts


def count_pieces(inputs: Sequence[str | os.PathLike], tokenizer_json: str, options: ExtendOptions, *,
                 workers: int = 1, progress: bool = False, pre_tokenizer: Any = None) -> PieceCounts:
    """Read every document of ``inputs`` once and count its pre-tokenizer pieces.

    ``pre_tokenizer``: the pre-tokenizer of ``tokenizer_json``, built already, for ``workers`` 1.
    """
    from cpt_ds.pack.workers import worker_start_method

    sources = discover_inputs(inputs)
    total = PieceCounts()
    bar = _bar(sum(s.num_bytes for s in sources), "counting", "B", progress)
    try:
        chunks = (chunk for index, source in enumerate(sources)
                  for chunk in iter_raw_chunks(index, source, txt_unit=options.txt_unit, json_key=options.json_key,
                                               chunk_bytes=CHUNK_BYTES))
        for counts in _map_in_order(chunks, tokenizer_json, options, workers, worker_start_method(), pre_tokenizer):
            total.add(counts)
            if bar is not None:
                bar.update(counts.num_raw_bytes)
    finally:
        if bar is not None:
            bar.close()
    return total


def _map_in_order(chunks: Iterable[RawChunk], tokenizer_json: str, options: ExtendOptions, workers: int,
                  start_method: str, pre_tokenizer: Any) -> Iterator[PieceCounts]:
    global _pre_tokenizer, _worker_options
    if workers <= 1:
        if pre_tokenizer is None:
            _init_counter(tokenizer_json, options)
        else:
            _pre_tokenizer, _worker_options = pre_tokenizer, options
        yield from map(_count_chunk, chunks)
        return
    from collections import deque

    with ProcessPoolExecutor(workers, mp_context=get_context(start_method), initializer=_init_counter,
                             initargs=(tokenizer_json, options)) as executor:
        pending: deque[Future[PieceCounts]] = deque()
        try:
            for chunk in chunks:
                pending.append(executor.submit(_count_chunk, chunk))
                if len(pending) >= 2 * workers + 2:  # bounded read-ahead: memory stays flat
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            executor.shutdown(wait=True, cancel_futures=True)


def _bar(total: int, desc: str, unit: str, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B", dynamic_ncols=True)


# --------------------------------------------------------------------------------------------------
# Continuing BPE
# --------------------------------------------------------------------------------------------------


class BpeContinuation:
    """The merge state of a byte-level BPE over counted pieces, extended one token at a time.

    ``rules`` maps an adjacent id pair to ``(priority, id formed)``; the lowest priority applies first
    (tiktoken form: the id formed; ranked form: the merge's index). ``settle`` applies rules to a
    piece until none applies, which is exactly how both ``tokenizers`` and tiktoken encode.
    """

    def __init__(self, base: BaseTokenizer):
        self.base = base
        self.token_of: list[str | None] = [None] * base.first_new_id  # id -> byte-level text
        for text, token_id in base.vocab.items():
            self.token_of[token_id] = text
        self.id_of: dict[str, int] = dict(base.vocab)
        # No new token may be a special token's text or a proper prefix/suffix of one: with the
        # special tokens in the vocabulary (see ``extended_spec``) such a token could otherwise join
        # a neighbour into a special token's id in plain text.
        self.forbidden = {content[:cut] for content in base.added for cut in range(1, len(content) + 1)}
        self.forbidden |= {content[cut:] for content in base.added for cut in range(len(content))}
        self.rules: dict[tuple[int, int], tuple[int, int]] = {}
        for index, (left, right) in enumerate(base.merges):
            formed = self.id_of[left + right]
            self.rules[(self.id_of[left], self.id_of[right])] = (formed if base.merge_form == "tiktoken" else index,
                                                                  formed)
        self.num_rules = len(base.merges)
        self.new_ids: list[int] = []
        self.extra_merges: list[tuple[str, str, int]] = []
        """Merges added, as (left, right, id formed), in the order they were made."""
        self._by_prefix: dict[str, list[str]] | None = None
        self._by_suffix: dict[str, list[str]] | None = None
        # Piece state: ids per distinct piece with two or more tokens (one token never changes).
        self.pieces: list[list[int]] = []
        self.counts: list[int] = []
        self.texts: list[str] = []

    # ---- pieces ----------------------------------------------------------------------------------

    def settle(self, ids: list[int], piece: str) -> list[int]:
        """Apply the lowest-priority rule (leftmost on ties) until none applies; a whole token is taken whole."""
        rules = self.rules
        while len(ids) > 1:
            best: tuple[int, int, int] | None = None
            for index in range(len(ids) - 1):
                rule = rules.get((ids[index], ids[index + 1]))
                if rule is not None and (best is None or rule[0] < best[0]):
                    best = (rule[0], index, rule[1])
            if best is None:
                break
            _, index, formed = best
            ids[index:index + 2] = [formed]
        if len(ids) > 1 and self.base.spec["model"].get("ignore_merges") and piece in self.id_of:
            return [self.id_of[piece]]
        return ids

    def load_pieces(self, counts: Counter[str], *, progress: bool = False) -> None:
        """Start from the base tokenizer's tokenization of each distinct piece."""
        model = self.base.hf.model
        bar = _bar(len(counts), "encoding pieces", "piece", progress)
        for piece, count in sorted(counts.items()):
            ids = [token.id for token in model.tokenize(piece)]
            if bar is not None:
                bar.update(1)
            if len(ids) > 1:
                self.pieces.append(ids)
                self.counts.append(count)
                self.texts.append(piece)
        if bar is not None:
            bar.close()

    # ---- training --------------------------------------------------------------------------------

    def train(self, num_new_tokens: int, min_frequency: int, *, progress: bool = False) -> None:
        pair_counts: Counter[tuple[int, int]] = Counter()
        where: dict[tuple[int, int], set[int]] = {}
        for index, (ids, count) in enumerate(zip(self.pieces, self.counts, strict=True)):
            for pair in zip(ids, ids[1:]):
                pair_counts[pair] += count
                where.setdefault(pair, set()).add(index)
        heap = [(-count, pair) for pair, count in pair_counts.items()]
        heapq.heapify(heap)
        bar = _bar(num_new_tokens, "learning tokens", "token", progress)
        while len(self.new_ids) < num_new_tokens and heap:
            negative, pair = heapq.heappop(heap)
            count = pair_counts.get(pair, 0)
            if count != -negative:
                continue  # stale: the pair's count changed after this entry was pushed
            if count < min_frequency:
                break
            text = self.token_of[pair[0]] + self.token_of[pair[1]]  # type: ignore[operator]
            if text in self.id_of or text in self.forbidden:
                continue  # never a token: already one (ranked merges), or a special token's text
            new_rules = self._add_token(text, pair)
            touched = set()
            for rule_pair in new_rules:
                touched.update(where.get(rule_pair, ()))
            changed: set[tuple[int, int]] = set()
            for index in touched:
                old = self.pieces[index]
                new = self.settle(list(old), self.texts[index])
                if new == old:
                    continue
                count_of_piece = self.counts[index]
                for old_pair in zip(old, old[1:]):
                    pair_counts[old_pair] -= count_of_piece
                    changed.add(old_pair)
                    where[old_pair].discard(index)
                for new_pair in zip(new, new[1:]):
                    pair_counts[new_pair] += count_of_piece
                    changed.add(new_pair)
                    where.setdefault(new_pair, set()).add(index)
                self.pieces[index] = new
            for changed_pair in changed:
                value = pair_counts[changed_pair]
                if value <= 0:
                    del pair_counts[changed_pair]
                    where.pop(changed_pair, None)
                else:
                    heapq.heappush(heap, (-value, changed_pair))
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()

    def _add_token(self, text: str, pair: tuple[int, int]) -> list[tuple[int, int]]:
        """Make ``text`` (the join of ``pair``) the next token; returns the id pairs of the rules added."""
        if self.base.merge_form == "tiktoken":
            self._affix_index()  # built before the new token joins the vocabulary, which indexes it itself
        token_id = self.base.first_new_id + len(self.new_ids)
        self.new_ids.append(token_id)
        self.token_of.append(text)
        self.id_of[text] = token_id
        if self.base.merge_form == "ranked":
            # Exactly the merge that was learned, ranked after every earlier one.
            self.rules[pair] = (self.num_rules + len(self.extra_merges), token_id)
            left, right = self.token_of[pair[0]], self.token_of[pair[1]]
            assert left is not None and right is not None
            self.extra_merges.append((left, right, token_id))
            return [pair]
        added: list[tuple[str, str, int]] = []
        for cut in range(1, len(text)):
            left, right = text[:cut], text[cut:]
            if left in self.id_of and right in self.id_of:
                added.append((left, right, token_id))
        # Tokens that the new one completes: an existing token = new + rest or rest + new.
        prefix, suffix = self._affix_index()
        for longer in prefix.get(text, ()):
            rest = longer[len(text):]
            if rest in self.id_of:
                added.append((text, rest, self.id_of[longer]))
        for longer in suffix.get(text, ()):
            rest = longer[:-len(text)]
            if rest in self.id_of:
                added.append((rest, text, self.id_of[longer]))
        self._index_affixes(text)
        pairs = []
        for left, right, formed in added:
            pair = (self.id_of[left], self.id_of[right])
            if pair not in self.rules:
                self.rules[pair] = (formed, formed)
                self.extra_merges.append((left, right, formed))
                pairs.append(pair)
        return pairs

    def _affix_index(self) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
        """Proper prefixes and suffixes of every token that are not tokens themselves -> those tokens.

        Built on first use (LLaMA-3: ~0.5 M entries, ~1 s); only such an affix can become a new token
        that, with another token, splits an existing one.
        """
        if self._by_prefix is None:
            self._by_prefix, self._by_suffix = {}, {}
            for text in self.id_of:
                self._index_affixes(text)
        assert self._by_suffix is not None
        return self._by_prefix, self._by_suffix

    def _index_affixes(self, text: str) -> None:
        if self._by_prefix is None or self._by_suffix is None:
            return
        for cut in range(1, len(text)):
            head, tail = text[:cut], text[cut:]
            # A token's own affixes never become new tokens; the other half may become a token later.
            if head not in self.id_of:
                self._by_prefix.setdefault(head, []).append(text)
            if tail not in self.id_of:
                self._by_suffix.setdefault(tail, []).append(text)


# --------------------------------------------------------------------------------------------------
# The extended tokenizer folder
# --------------------------------------------------------------------------------------------------


def extended_spec(base: BaseTokenizer, bpe: BpeContinuation) -> dict[str, Any]:
    """The base ``tokenizer.json`` with the new tokens and merges appended; everything else unchanged."""
    vocab = dict(base.vocab)
    for token_id in bpe.new_ids:
        vocab[bpe.token_of[token_id]] = token_id  # type: ignore[index]
    merges: list[tuple[str, str]]
    if base.merge_form == "tiktoken":
        # Ordered by the id formed; a merge added for an original token goes after that token's own.
        keyed = [(vocab[left + right], index, left, right) for index, (left, right) in enumerate(base.merges)]
        keyed += [(formed, len(base.merges) + index, left, right)
                  for index, (left, right, formed) in enumerate(bpe.extra_merges)]
        keyed.sort()
        merges = [(left, right) for _, _, left, right in keyed]
    else:
        merges = list(base.merges) + [(left, right) for left, right, _ in bpe.extra_merges]
    # Special tokens go into the BPE vocabulary too, under their own ids: ``tokenizers`` gives an added
    # token missing from the vocabulary the id "vocabulary size + position", which the new tokens
    # would shift (LLaMA-3's <|begin_of_text|> would move from 128,000 to 128,000 + N). They have no
    # merges, and no new token is an affix of one (``BpeContinuation.forbidden``), so text never
    # turns into them; the fast encoder and transformers accept a special token in both places.
    for content, token_id in base.added.items():
        vocab.setdefault(content, token_id)
    vocab = dict(sorted(vocab.items(), key=lambda item: item[1]))
    spec = json.loads(base.json_text)  # a copy
    spec["model"]["vocab"] = vocab
    spec["model"]["merges"] = [f"{l} {r}" for l, r in merges] if base.merges_as_strings else [[l, r] for l, r in merges]
    return spec


def _piece_lengths(model: Any, counts: Counter[str]) -> int:
    return sum(count * len(model.tokenize(piece)) for piece, count in counts.items())


def measure(before_model: Any, after_model: Any, counts: PieceCounts) -> dict[str, Any]:
    """Tokens per character of the held-out documents before and after (exact: BPE works piece by piece)."""
    result: dict[str, Any] = {}
    for name, pieces, num_documents, num_chars in (
            ("all", counts.eval_all, counts.num_eval_documents, counts.num_eval_chars),
            ("cjk_dominant", counts.eval_cjk, counts.num_eval_cjk_documents, counts.num_eval_cjk_chars)):
        if num_chars == 0:
            result[name] = {"num_documents": 0, "num_chars": 0}
            continue
        before, after = _piece_lengths(before_model, pieces), _piece_lengths(after_model, pieces)
        result[name] = {"num_documents": num_documents, "num_chars": num_chars, "tokens_before": before,
                        "tokens_after": after, "tokens_per_char_before": before / num_chars,
                        "tokens_per_char_after": after / num_chars, "token_reduction": 1 - after / before}
    return result


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
    for content in base.added:
        # Special tokens join the BPE vocabulary (see ``extended_spec``); one that the pre-tokenizer
        # leaves whole would then be taken whole from plain text (``ignore_merges``).
        if [piece for piece, _ in base.hf.pre_tokenizer.pre_tokenize_str(content)] == [content]:
            raise VocabExtensionError(f"special token {content!r} of {base.folder} is one whole pre-tokenizer "
                                      "piece, so plain text could turn into it once it is in the vocabulary; "
                                      "this tokenizer cannot be extended by tools/extend_vocab.py")
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
    spec = extended_spec(base, bpe)
    spec_text = json.dumps(spec, ensure_ascii=False, indent=2) + "\n"

    from tokenizers import Tokenizer

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
    ranked = sorted(frequency.items(), key=lambda item: (-item[1], item[0]))[:options.num_top_tokens]
    top = [{"id": token_id, "text": new_tokens[token_id - base.first_new_id]["text"], "count": count}
           for token_id, count in ranked]

    from cpt_ds.pack.encoders import plan_fast_encoder

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
              "eval": measure(base_model, Tokenizer.from_str(spec_text).model, counts), "top_new_tokens": top}

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
    return ExtendResult(output, report)
