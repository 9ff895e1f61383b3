#!/usr/bin/env python
"""Benchmark of tools/extend_vocab.py: tokens per character before/after, and the embedding init.

    python benchmarks/extend_vocab.py [--corpus DIR] [--tokenizer LLAMA3_DIR] [--num-new 1000 5000 20000]
                                      [--curve-steps 150] [--skip-curve]

Part 1 (LLaMA-3 tokenizer): the domain corpus is the Chinese translation of *Rust by Example* that
rustup installs with the Rust docs (``rustc --print sysroot``/share/doc/rust/html/rust-by-example/zh,
modern technical Chinese with code); each HTML page's ``<main>`` text is one document (print.html,
the whole book on one page, and toc.html are left out: they repeat every page). The tool holds out
whole pages by its hash (``--eval-fraction 0.2``) and reports tokens per character on them.

Part 2 (tiny model, CPU): a tiny LLaMA-3-shaped model pretrained 300 steps with the tiny tokenizer
on Chinese + English text (cpt_ds/assets, Python's docs), then grown to the tokenizer extended on the
Chinese training documents. Bits per character on held-out Chinese documents at step 0 for the
original tokenizer and model, the sub-token-mean init and the mean-of-all-rows init, then a short
training run of each on the Chinese training documents (one AdamW run per model, 10 warm-up
steps then a constant 1e-3): bits per character against steps, characters read and CPU seconds.
"""

from __future__ import annotations

import argparse
import html
import json
import re
import subprocess
import sys
import tempfile
import time
from html.parser import HTMLParser
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

LLAMA3 = REPO.parent / "shared" / "llama3-tokenizer"
SKIPPED_PAGES = {"print.html", "toc.html", "404.html"}


def default_corpus() -> Path | None:
    try:
        sysroot = subprocess.run(["rustc", "--print", "sysroot"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    folder = Path(sysroot.strip()) / "share" / "doc" / "rust" / "html" / "rust-by-example" / "zh"
    return folder if folder.is_dir() else None


class _MainText(HTMLParser):
    """The text inside <main>, as a browser would show it (code blocks keep their line breaks)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.depth = 0
        self.parts: list[str] = []

    def handle_starttag(self, tag: str, attrs) -> None:
        if tag == "main":
            self.depth += 1
        elif self.depth and tag in ("p", "li", "h1", "h2", "h3", "h4", "pre", "tr", "br", "div"):
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag == "main":
            self.depth -= 1

    def handle_data(self, data: str) -> None:
        if self.depth:
            self.parts.append(data)


def page_documents(folder: Path) -> list[tuple[str, str]]:
    documents = []
    for page in sorted(folder.rglob("*.html")):
        if page.name in SKIPPED_PAGES:
            continue
        parser = _MainText()
        parser.feed(page.read_text(encoding="utf-8"))
        text = re.sub(r"\n{3,}", "\n\n", html.unescape("".join(parser.parts))).strip()
        if text:
            documents.append((page.relative_to(folder).as_posix(), text))
    return documents


def cjk_lines_of_held_out_pages(source: Path, fraction: float) -> list[str]:
    """The CJK-dominant lines (prose, not code) of the pages the tool held out (same hash, same split)."""
    from cpt_ds.pack.pieces import is_cjk_dominant, is_held_out

    lines = []
    for record in source.read_text(encoding="utf-8").splitlines():
        text = json.loads(record)["text"]
        if is_held_out(text, fraction):
            lines += [line for line in text.splitlines() if line.strip() and is_cjk_dominant(line)]
    return lines


def count_tokens(tokenizer_dir: Path, texts: list[str]) -> int:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    tokenizer.encode_special_tokens = True
    return sum(len(e.ids) for e in tokenizer.encode_batch(texts, add_special_tokens=False))


def part1(corpus: Path, tokenizer: Path, sizes: list[int], work: Path) -> None:
    from cpt_ds.pack.extend_vocab import ExtendOptions, extend_vocabulary
    from cpt_ds.pack.pieces import is_cjk_dominant

    documents = page_documents(corpus)
    source = work / "rbe_zh.jsonl"
    source.write_text("".join(json.dumps({"text": t, "page": p}, ensure_ascii=False) + "\n" for p, t in documents),
                      encoding="utf-8")
    num_chars = sum(len(t) for _, t in documents)
    num_cjk = sum(1 for _, t in documents for c in t if "\u4e00" <= c <= "\u9fff")
    print(f"corpus: {corpus}\n  {len(documents)} pages, {num_chars:,} characters ({num_cjk:,} Han), "
          f"{sum(is_cjk_dominant(t) for _, t in documents)} CJK-dominant pages; held out: whole pages, "
          "--eval-fraction 0.2 (by a hash of the page text)\n")
    print("| new tokens asked | learned | held-out text | pages | chars | tokens/char before | after | fewer tokens "
          "| seconds |")
    print("|---|---|---|---|---|---|---|---|---|")
    for size in sizes:
        out = work / f"llama3_rbe_{size}"
        start = time.perf_counter()
        result = extend_vocabulary(tokenizer, [source], out, ExtendOptions(num_new_tokens=size, eval_fraction=0.2))
        seconds = time.perf_counter() - start
        report = result.report
        for name in ("all", "cjk_dominant"):
            row = report["eval"][name]
            if row["num_chars"] == 0:
                print(f"| {size:,} | {report['num_new_tokens']:,} | {name} | 0 | | | | | |")
                continue
            print(f"| {size:,} | {report['num_new_tokens']:,} | {name} | {row['num_documents']} | {row['num_chars']:,} "
                  f"| {row['tokens_per_char_before']:.3f} | {row['tokens_per_char_after']:.3f} "
                  f"| {100 * row['token_reduction']:.1f}% | {seconds:.1f} |")
        lines = cjk_lines_of_held_out_pages(source, 0.2)
        before, after = count_tokens(tokenizer, lines), count_tokens(out, lines)
        line_chars = sum(len(line) for line in lines)
        print(f"| {size:,} | {report['num_new_tokens']:,} | CJK-dominant lines of the held-out pages | "
              f"{len(lines)} lines | {line_chars:,} | {before / line_chars:.3f} | {after / line_chars:.3f} "
              f"| {100 * (1 - after / before):.1f}% | |")
        top = ", ".join(repr(t["text"]) for t in report["top_new_tokens"][:12])
        print(f"|  | fast encoder: {report['fast_encoder']}; top tokens: {top} | | | | | | | |")
    print()


def continue_training(model, train_ids, eval_ids, held_out, *, steps: int, chars_per_token: float,
                      batch: int = 16, seq: int = 64, lr: float = 1e-3) -> list[tuple[int, float, int, float]]:
    """One AdamW run (10 warm-up steps, then constant LR) with held-out bits per character 6 times.

    Returns ``(step, training seconds, characters read, bits per character)``, step 0 first.
    """
    import torch

    from cpt_ds.toy import bits_per_char

    stream = torch.tensor([t for ids in train_ids for t in [1022, *ids, 1023]])
    generator = torch.Generator().manual_seed(1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    points = [(0, 0.0, 0, bits_per_char(model, eval_ids, held_out, bos=1022))]
    every = max(1, steps // 5)
    seconds = 0.0
    for step in range(1, steps + 1):
        start = time.perf_counter()
        model.train()
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, step / 10)
        starts = torch.randint(0, stream.numel() - seq - 1, (batch,), generator=generator)
        inputs = torch.stack([stream[s:s + seq] for s in starts.tolist()])
        model(input_ids=inputs, labels=inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds += time.perf_counter() - start
        if step % every == 0:
            points.append((step, seconds, int(step * batch * seq * chars_per_token),
                           bits_per_char(model, eval_ids, held_out, bos=1022)))
    return points


def part2(steps: int, work: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from cpt_ds.model import resize_embeddings
    from cpt_ds.pack.extend_vocab import ExtendOptions, extend_vocabulary
    from cpt_ds.pack.tiny_tokenizer import train_tokenizer
    from cpt_ds.toy import (
        TINY_MODEL, chinese_documents, encode_documents, english_documents, held_out_split, pretrain,
        tokenizer_training_texts, write_jsonl_texts)

    torch.set_num_threads(1)
    tiny = train_tokenizer(tokenizer_training_texts(), work / "tiny", vocab_size=1024)
    # The held-out split of tests/test_vocab_bpc.py: every 5th Chinese document, whole.
    train_zh, held_out = held_out_split(chinese_documents())
    domain = write_jsonl_texts(work / "zh_train.jsonl", train_zh)
    extended = work / "tiny_extended"
    num_new = 200
    extend_vocabulary(tiny, [domain], extended, ExtendOptions(num_new_tokens=num_new, eval_fraction=0.0))

    torch.manual_seed(0)
    shape = {k: v for k, v in TINY_MODEL.items() if k != "architectures"}
    model = LlamaForCausalLM(LlamaConfig(**{**shape, "vocab_size": 1024}))
    pretrain(model, encode_documents(tiny, train_zh + english_documents(40)), bos=1022, eos=1023, steps=300)
    base = work / "tiny_base"
    model.save_pretrained(base)

    held_chars = sum(len(t) for t in held_out)
    train_chars = sum(len(t) for t in train_zh)
    print(f"tiny model {shape['hidden_size']} wide x {shape['num_hidden_layers']} layers, pretrained 300 steps; "
          f"{num_new} new tokens learned on {len(train_zh)} Chinese documents ({train_chars:,} chars), "
          f"held out {len(held_out)} whole documents ({held_chars:,} chars)")
    runs = {"original tokenizer and model": (tiny, None, 1024),
            "sub-token-mean init": (extended, extended, 1024 + num_new),
            "mean-of-all-rows init": (extended, None, 1024 + num_new)}
    curves = {}
    for name, (tokenizer, record, vocab) in runs.items():
        grown = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
        if vocab > 1024:
            resize_embeddings(grown, vocab, tokenizer_path=record, model_path=base)
        eval_ids = encode_documents(tokenizer, held_out)
        train_ids = encode_documents(tokenizer, train_zh)
        chars_per_token = train_chars / sum(len(ids) + 2 for ids in train_ids)
        points = continue_training(grown, train_ids, eval_ids, held_out, steps=steps, chars_per_token=chars_per_token)
        curves[name] = points
    print("\n| model | " + " | ".join(f"step {s} ({c:,} chars, {t:.0f} s)" if s else "step 0"
                                       for s, t, c, _ in curves["sub-token-mean init"]) + " |")
    print("|---|" + "---|" * len(curves["sub-token-mean init"]))
    for name, points in curves.items():
        print(f"| {name} | " + " | ".join(f"{bpc:.3f}" for *_, bpc in points) + " |")
    print("\nbits per character on the held-out documents (loss sum / ln 2 / characters); each training step is "
          "16 x 64 tokens, so an extended tokenizer reads more characters per step; the (chars, s) headers are "
          "the sub-token-mean run's, CPU seconds of training (one thread), evaluation excluded:")
    for name, points in curves.items():
        print(f"  {name}: " + ", ".join(f"{c:,} chars / {t:.1f} s -> {bpc:.3f}" for _, t, c, bpc in points[1:]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=default_corpus(),
                        help="folder of Rust by Example's zh HTML pages (default: from rustc --print sysroot)")
    parser.add_argument("--tokenizer", type=Path, default=LLAMA3)
    parser.add_argument("--num-new", type=int, nargs="+", default=[1000, 5000, 20000])
    parser.add_argument("--curve-steps", type=int, default=150)
    parser.add_argument("--skip-curve", action="store_true")
    parser.add_argument("--skip-llama3", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cpt_ds_bench_vocab_") as tmp:
        work = Path(tmp)
        if not args.skip_llama3:
            if args.corpus is None or not (args.tokenizer / "tokenizer.json").is_file():
                print(f"part 1 skipped: corpus {args.corpus} or tokenizer {args.tokenizer} not found")
            else:
                part1(args.corpus, args.tokenizer, args.num_new, work)
        if not args.skip_curve:
            part2(args.curve_steps, work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
