#!/usr/bin/env python
"""Build the packing benchmark corpus: real Chinese and English text, one document per line.

Sources (both from ordinary package registries; see docs/benchmarks.md, "Packing speed", for the commands):

* Chinese: the npm package ``chinese-poetry`` 2.0.1 (MIT): Tang and Song poems (traditional
  characters), Song ci, the Analects and the Book of Songs. One poem = one document.
* English: the reStructuredText sources of the Python 3.11 documentation from Debian's
  ``python3.11-doc`` 3.11.2-6+deb12u9 (``usr/share/doc/python3.11/html/_sources``). Consecutive
  paragraphs are joined into documents of about 1,000 characters.

Lines are joined with spaces inside a document so that ``load_dataset("text")`` (the baseline) and
``pack_corpus --txt-unit line`` see the same documents. The output is deterministic.

    python benchmarks/make_bench_corpus.py --chinese-poetry package/dist --python-docs \\
        py311doc/usr/share/doc/python3.11/html/_sources --out /work/bench_corpus
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Iterator
from pathlib import Path

# Enough for ~14 M LLaMA-3 tokens in ~70 K documents, the size the measurements used.
NUM_TANG_FILES = 58
NUM_SONG_FILES = 48
ENGLISH_DOC_CHARS = 1000


def one_line(text: str) -> str:
    return " ".join(text.split())


def chinese_documents(dist: Path) -> Iterator[str]:
    def poems(pattern: str, limit: int) -> Iterator[str]:
        files = sorted(dist.glob(pattern), key=lambda p: int(p.stem.rsplit(".", 1)[1]))[:limit]
        for file in files:
            for poem in json.loads(file.read_text(encoding="utf-8")):
                head = poem.get("title") or poem.get("rhythmic") or ""
                yield one_line(f"{head}（{poem.get('author', '')}）" + "".join(poem.get("paragraphs", [])))

    yield from poems("quantangshi/poet.tang.*.json", NUM_TANG_FILES)
    yield from poems("quantangshi/poet.song.*.json", NUM_SONG_FILES)
    yield from poems("songci/ci.song.*[0-9].json", 1000)
    for chapter in json.loads((dist / "lunyu" / "lunyu.json").read_text(encoding="utf-8")):
        yield one_line(chapter["chapter"] + "".join(chapter["paragraphs"]))
    for poem in json.loads((dist / "shijing" / "shijing.json").read_text(encoding="utf-8")):
        yield one_line(poem["title"] + "".join(poem["content"]))


def english_documents(sources: Path) -> Iterator[str]:
    for file in sorted(sources.rglob("*.rst.txt")):
        document: list[str] = []
        size = 0
        for paragraph in re.split(r"\n\s*\n", file.read_text(encoding="utf-8")):
            text = one_line(paragraph)
            if not text:
                continue
            document.append(text)
            size += len(text)
            if size >= ENGLISH_DOC_CHARS:
                yield " ".join(document)
                document, size = [], 0
        if document:
            yield " ".join(document)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chinese-poetry", type=Path, required=True, help="the npm package's dist/ folder")
    parser.add_argument("--python-docs", type=Path, required=True, help="python3.11-doc's html/_sources folder")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for name, docs in (("zh_poetry.txt", chinese_documents(args.chinese_poetry)),
                       ("en_python_docs.txt", english_documents(args.python_docs))):
        lines = [d for d in docs if d]
        (args.out / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
        counts[name] = len(lines)
    for name, count in counts.items():
        print(f"{args.out / name}: {count:,} documents, {(args.out / name).stat().st_size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
