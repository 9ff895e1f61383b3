"""Training samples, the held-out split, the sample order and the per-rank batch layout."""

from __future__ import annotations

import numpy as np
import pytest

from cpt_ds.data.loader import IGNORE_INDEX, SampleOrder, TrainLoader, eval_batches
from cpt_ds.data.windows import PackedSamples, TokenStream, split_documents
from cpt_ds.pack.writer import IndexedTokenWriter
from cpt_ds.token_file import IndexedTokenFile


def token_file(path, documents: list[list[int]]) -> IndexedTokenFile:
    with IndexedTokenWriter(path, dtype=np.int32) as writer:
        for document in documents:
            writer.add_document(np.array(document, dtype=np.int32))
        writer.finalize({"vocab_size": 1000})
    return IndexedTokenFile(path)


@pytest.fixture
def two_files(tmp_path):
    a = token_file(tmp_path / "a", [[1, 2, 3, 0], [4, 5, 0], [6, 7, 8, 9, 0]])
    b = token_file(tmp_path / "b", [[10, 11, 0], [12, 13, 14, 0]])
    return a, b


def test_labels_are_the_next_tokens_across_documents_and_files(two_files):
    stream = TokenStream.whole(two_files)
    flat = [1, 2, 3, 0, 4, 5, 0, 6, 7, 8, 9, 0, 10, 11, 0, 12, 13, 14, 0]
    assert stream.read(0, stream.num_tokens).tolist() == flat
    samples = PackedSamples(stream, block_size=4)
    assert len(samples) == (len(flat) - 1) // 4
    for i in range(len(samples)):
        sample = samples[i]
        assert sample["input_ids"].tolist() == flat[4 * i: 4 * i + 4]
        assert sample["labels"].tolist() == flat[4 * i + 1: 4 * i + 5]
    # Every token but the first is a label exactly once.
    labels = np.concatenate([samples[i]["labels"] for i in range(len(samples))])
    assert labels.tolist() == flat[1: 1 + 4 * len(samples)]
    assert stream.document_starts(2, 10).tolist() == [2, 5]  # documents begin at stream tokens 4 and 7


def test_held_out_split_is_deterministic_disjoint_and_complete(tmp_path):
    documents = [[i] * (1 + i % 5) + [0] for i in range(1, 201)]
    file = token_file(tmp_path / "c", documents)
    train, held = split_documents([file], 0.1, seed=3)
    assert (train, held) == split_documents([file], 0.1, seed=3)
    assert split_documents([file], 0.1, seed=4)[1] != held
    train_tokens = TokenStream([file], train).read(0, TokenStream([file], train).num_tokens)
    held_tokens = TokenStream([file], held).read(0, TokenStream([file], held).num_tokens)
    held_ids = set(held_tokens.tolist()) - {0}
    assert len(held_ids) == 20 and not held_ids & set(train_tokens.tolist())
    assert len(train_tokens) + len(held_tokens) == file.num_tokens


def test_sample_order_reshuffles_each_epoch_and_crosses_boundaries():
    order = SampleOrder(10, seed=1)
    first, second = order.ids(0, 10), order.ids(10, 20)
    assert sorted(first) == sorted(second) == list(range(10)) and first.tolist() != second.tolist()
    assert order.ids(7, 13).tolist() == first[7:].tolist() + second[:3].tolist()


class FakeSamples:
    block_size = 2

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"input_ids": np.array([i, i]), "labels": np.array([i, i])}


def consumed_ids(world: int, micro: int, accumulation: int, steps: int, start: int = 0) -> list[int]:
    loaders = [TrainLoader(FakeSamples(10), micro_batch_size=micro, gradient_accumulation_steps=accumulation,
                           dp_rank=r, dp_world_size=world, seed=5) for r in range(world)]
    seen = []
    for loader in loaders:
        loader.load_state_dict({**loader.state_dict(), "consumed_samples": start})
    for _ in range(steps):
        for loader in loaders:
            seen += [int(x) for batch in loader.next_step() for x in batch["input_ids"][:, 0]]
    return seen


def test_every_rank_layout_consumes_the_same_positions_without_replay_or_skip():
    # 2 ranks x 2 micro x 1 accumulation and 1 rank x 2 micro x 2 accumulation: same 4 positions per step.
    two_ranks = consumed_ids(world=2, micro=2, accumulation=1, steps=5)
    one_rank = consumed_ids(world=1, micro=2, accumulation=2, steps=5)
    assert sorted(two_ranks) == sorted(one_rank)
    order = SampleOrder(10, seed=5).ids(0, 20).tolist()
    assert sorted(two_ranks) == sorted(order)  # two epochs, each sample exactly twice
    # Resuming at consumed_samples 8 on another world size continues exactly where it stopped.
    assert sorted(consumed_ids(world=1, micro=4, accumulation=1, steps=3, start=8)) == sorted(order[8:20])


def test_loader_state_refuses_other_data():
    loader = TrainLoader(FakeSamples(10), micro_batch_size=1, gradient_accumulation_steps=1, dp_rank=0,
                         dp_world_size=1, seed=5)
    with pytest.raises(ValueError, match="had 12 training samples, now 10"):
        loader.load_state_dict({**loader.state_dict(), "num_samples": 12})


def test_eval_batches_cover_every_sample_once_with_equal_batch_counts():
    samples = FakeSamples(7)
    per_rank = [list(eval_batches(samples, micro_batch_size=2, dp_rank=r, dp_world_size=3)) for r in range(3)]
    assert len({len(batches) for batches in per_rank}) == 1
    seen = [int(row[0]) for batches in per_rank for b in batches for row, labels in zip(b["input_ids"], b["labels"])
            if labels[0] != IGNORE_INDEX]
    assert sorted(seen) == list(range(7))
