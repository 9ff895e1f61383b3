"""Continuing a byte-level BPE: the merge state over counted pieces, new tokens, the extended ``tokenizer.json``.

Steps 2 and 3 of ``cpt_ds/pack/extend_vocab.py``: classic BPE training continues on the base
tokenizer's own tokenization of the counted pieces, and after each new token every touched piece is
brought to what the extended tokenizer will really give for it.

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
"""

from __future__ import annotations

import heapq
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cpt_ds.pack.encoders import byte_level_alphabet
from cpt_ds.pack.pieces import progress_bar

MergeForm = Literal["tiktoken", "ranked"]


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



def token_bytes(token: str) -> bytes:
    """The bytes a byte-level token stands for (``Ġ`` = a space)."""
    return bytes(_UNICODE_TO_BYTE[c] for c in token)


_UNICODE_TO_BYTE = {c: b for b, c in byte_level_alphabet().items()}


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
        bar = progress_bar(len(counts), "encoding pieces", "piece", progress)
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
        bar = progress_bar(num_new_tokens, "learning tokens", "token", progress)
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

