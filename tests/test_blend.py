"""Weighted blends with replay: the schedule, per-corpus training sums, per-set eval, resume, plots."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from cpt_ds.config import ConfigError, RunConfig
from cpt_ds.data.blend import BlendSchedule, component_names, parse_data_path
from cpt_ds.data.corpora import BlendOrder, build_run_data
from cpt_ds.preflight import preflight
from cpt_ds.token_file import IndexedTokenFile

from conftest import REPO, eval_records, launch, metrics, run_config, train
from helpers_runs import assert_same_curve_to_float_rounding, change_world_size

sys.path.insert(0, str(REPO / "tools"))
from plot_run import plot_run, read_records  # noqa: E402

WEIGHT_SETS = [[0.8, 0.2], [0.95, 0.05], [0.99, 0.01], [1, 1, 1], [0.5, 0.3, 0.15, 0.05],
               [0.6, 0.25, 0.1, 0.04, 0.01], [0.1] * 10]


@pytest.mark.parametrize("weights", WEIGHT_SETS, ids=lambda w: "-".join(map(str, w[:5])))
def test_blend_proportions_hold_at_every_prefix(weights):
    schedule = BlendSchedule(weights)
    num_positions = 100_000
    component, index = schedule.assign(0, num_positions)
    onehot = np.zeros((num_positions, len(weights)), dtype=np.int64)
    onehot[np.arange(num_positions), component] = 1
    counts = np.cumsum(onehot, axis=0)  # counts[k - 1] = each component's count after k positions
    k = np.arange(1, num_positions + 1)[:, None]
    normalized = np.array(weights, dtype=np.float64) / sum(weights)
    deviation = np.abs(counts - normalized[None] * k)
    assert (deviation <= 2 + 0.001 * k).all(), deviation.max()
    # A position's index inside its component is that component's count before it: no gaps, no repeats.
    assert np.array_equal(index, (counts - onehot)[np.arange(num_positions), component])
    assert np.array_equal(schedule.counts(num_positions), counts[-1])


def test_random_access_equals_sequential_and_is_deterministic():
    schedule = BlendSchedule([0.5, 0.3, 0.15, 0.05])
    whole = schedule.assign(0, 5_000)
    for start, stop in [(0, 1), (17, 333), (4_096, 5_000), (2_500, 2_500)]:
        part = schedule.assign(start, stop)
        assert np.array_equal(part[0], whole[0][start:stop]) and np.array_equal(part[1], whole[1][start:stop])
        assert np.array_equal(schedule.counts(start), np.bincount(whole[0][:start], minlength=4))
    again = BlendSchedule([0.5, 0.3, 0.15, 0.05]).assign(0, 5_000)
    assert all(np.array_equal(a, b) for a, b in zip(whole, again))
    # Far positions cost what near ones cost (no index sized by the run) and stay consistent.
    far = 10**12
    component, index = schedule.assign(far, far + 64)
    assert np.array_equal(index, schedule.counts(far)[component] + np.array(
        [np.sum(component[:i] == c) for i, c in enumerate(component)]))
    order = BlendOrder([0.5, 0.3, 0.15, 0.05], [100, 40, 7, 3], seed=5)
    sequential = np.concatenate([order.ids(i, i + 8) for i in range(0, 800, 8)])
    assert np.array_equal(sequential, order.ids(0, 800))
    assert np.array_equal(BlendOrder([0.5, 0.3, 0.15, 0.05], [100, 40, 7, 3], seed=5).ids(0, 800), sequential)
    assert not np.array_equal(BlendOrder([0.5, 0.3, 0.15, 0.05], [100, 40, 7, 3], seed=6).ids(0, 800), sequential)


def test_each_component_follows_its_own_permutation_per_epoch():
    """A small replay corpus repeats in a new order each epoch; a large one is sub-sampled."""
    sizes = [1_000, 5]
    order = BlendOrder([0.8, 0.2], sizes, seed=3)
    ids = order.ids(0, 100)
    replay = ids[ids >= 1_000] - 1_000
    assert len(replay) == 20  # 4 epochs of the 5-sample corpus
    epochs = replay.reshape(4, 5)
    assert all(sorted(epoch) == [0, 1, 2, 3, 4] for epoch in epochs.tolist())
    assert len({tuple(epoch) for epoch in epochs.tolist()}) > 1  # reshuffled, not one fixed order
    domain = ids[ids < 1_000]
    assert len(domain) == 80 and len(set(domain.tolist())) == 80  # sub-sampled without repeats
    assert order.epochs(100) == [0.08, 4.0]


def test_component_names_are_the_shortest_unique_trailing_parts():
    assert component_names(["data/zh/train", "data/en/train"]) == ["zh/train", "en/train"]
    assert component_names(["/a/b/zh", "/c/general", "/d/e/zh"]) == ["b/zh", "general", "e/zh"]
    assert component_names(["data/zh/part-*", "data/en"]) == ["zh", "en"]
    components, problems = parse_data_path(["0.8", "data/zh/train", 0.2, "data/en/train"])
    assert problems == []
    assert [(c.name, c.paths, c.weight) for c in components] == [
        ("zh/train", ("data/zh/train",), 0.8), ("en/train", ("data/en/train",), 0.2)]
    plain, _ = parse_data_path(["data/zh", "data/en"])
    assert [(c.name, c.paths, c.weight) for c in plain] == [("zh+en", ("data/zh", "data/en"), None)]


def test_each_bad_blend_gives_its_error():
    def problems(data_path, **extra):
        return RunConfig.from_flat({"data_path": data_path, "tokenizer_name_or_path": "tok", "full_finetuning": True,
                                    "max_steps": 10, **extra}).config_problems()

    assert problems(["0.8", "data/zh", "data/en"]) == [
        "data_path entry 3 'data/en' should be a weight before a prefix: weight every prefix "
        "('0.8 data/zh 0.2 data/en') or none of them"]
    assert problems(["0", "data/zh", "-0.5", "data/en"]) == [
        "data_path weight 0 of data/zh must be a positive number", "data_path weight -0.5 of data/en must be a positive number"]
    assert problems(["0.5", "data/zh", "0.5", "data/zh"]) == ["data_path names data/zh twice; give each prefix one weight"]
    assert problems(["0.5", "data/zh", "0.5"]) == ["data_path weight 0.5 (entry 3) has no prefix after it"]
    assert problems(["data/zh", "data/zh"]) == ["data_path names data/zh twice; name each prefix once"]
    assert problems(["0.5", "data/zh", "0.5", "data/en"], max_steps=-1) == [
        "a weighted data_path has no epoch (each component repeats or is sub-sampled by its weight): set max_steps "
        "instead of num_train_epochs"]
    assert problems(["data/zh"], eval_data_path=["x=data/a", "x=data/b"]) == [
        "eval_data_path names the set 'x' twice; give each set its own NAME=PREFIX"]
    config = RunConfig.from_flat({"data_path": ["0.5", "data/zh", "-1", "data/zh", "x"], "tokenizer_name_or_path": "t",
                                  "full_finetuning": True})
    with pytest.raises(ConfigError) as error:  # every problem in one error
        preflight(config, world_size=1)
    message = str(error.value)
    assert "weight -1 of data/zh must be a positive number" in message
    assert "entry 5 'x' should be a weight" in message
    assert "set max_steps instead of num_train_epochs" in message


def test_validation_split_holds_out_documents_of_every_component(assets):
    files = {"corpus": [IndexedTokenFile(str(assets.corpus))], "corpus_b": [IndexedTokenFile(str(assets.corpus_b))]}
    data = build_run_data([("corpus", 0.7, files["corpus"]), ("corpus_b", 0.3, files["corpus_b"])], [],
                          block_size=32, validation_split_percentage=0.05, max_train_samples=None,
                          max_eval_samples=8, seed=7)
    assert [c.name for c in data.eval_sets] == ["corpus", "corpus_b"]
    for train_part, held in zip(data.train, data.eval_sets):
        assert len(held.samples) == 8 and held.files == train_part.files
        total = train_part.files[0].num_tokens
        assert train_part.stream.num_tokens + held.stream.num_tokens == total
        assert 0 < held.stream.num_tokens < 0.15 * total
    sample = data.samples[len(data.train[0].samples)]  # the first sample of the second component
    assert int(sample["corpus"]) == 1


# --------------------------------------------------------------------------------------------------
# Distributed: resume, world-size change, per-corpus sums, per-set eval, plots (2 gloo ranks, fp32)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def replay_corpus(assets, tmp_path_factory) -> Path:
    """A small second corpus (a few documents of the other half of the text) that wraps its epoch quickly."""
    from cpt_ds.pack.packing import PackOptions, pack_corpus

    root = tmp_path_factory.mktemp("replay")
    lines, num_chars = [], 0
    for line in (assets.root / "text" / "corpus_b.jsonl").read_text(encoding="utf-8").splitlines():
        if num_chars < 900:  # about 13 samples of 32 tokens: the run's ~19 replay positions wrap it once
            lines.append(line)
            num_chars += len(json.loads(line)["text"])
    source = root / "replay.jsonl"
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    pack_corpus([source], assets.tokenizer, root / "general", PackOptions(), workers=1)
    return root / "general"


def blend_config(assets, replay: Path, out: Path, **overrides):
    config = run_config(assets, out, data_path=["0.7", str(assets.corpus), "0.3", str(replay)],
                        eval_data_path=[str(assets.corpus_b), f"general={replay}"], max_eval_samples=6,
                        max_steps=8, eval_steps=4)
    config.pop("validation_split_percentage")
    config.update(overrides)
    return config


def stable(records: list[dict]) -> list[dict]:
    """Records without the fields that measure time or memory."""
    return [{k: v for k, v in r.items() if k not in ("tokens_per_second", "memory_gib", "mfu")} for r in records]


def test_blend_resumes_bitwise_across_a_replay_epoch_wrap(assets, replay_corpus, tmp_path):
    reference, resumed = tmp_path / "a" / "out", tmp_path / "b" / "out"
    done = train(blend_config(assets, replay_corpus, reference), workdir=tmp_path / "a").check()
    assert "corpus weight 0.700" in done.output and "general weight 0.300" in done.output
    train(blend_config(assets, replay_corpus, resumed, stop_at_step=4), workdir=tmp_path / "b").check()
    train(blend_config(assets, replay_corpus, resumed), workdir=tmp_path / "b").check()
    assert stable(metrics(resumed)) == stable(metrics(reference))
    records = [r for r in metrics(reference) if "loss" in r]
    epochs = [r["epochs"]["general"] for r in records]
    assert epochs[3] < 1.0 < epochs[-1], epochs  # the replay corpus wraps its epoch after the resume point (4)
    # Per-corpus sums: tokens add up to every label of the interval, losses combine to the global loss.
    for record in records:
        corpora = record["corpora"]
        assert set(corpora) == {"corpus", "general"}
        tokens = sum(c["tokens"] for c in corpora.values())
        assert tokens == 8 * 32  # logging_steps 1: one step of 8 samples x 32 labels
        combined = sum(c["loss"] * c["tokens"] for c in corpora.values() if c["tokens"]) / tokens
        assert combined == pytest.approx(record["loss"], rel=1e-12)
    # One validation set per name, and eval_loss their token-weighted mean.
    for record in eval_records(reference):
        sets = record["sets"]
        assert list(sets) == ["corpus_b", "general"]
        assert record["eval_tokens"] == sum(s["eval_tokens"] for s in sets.values())
        assert record["eval_loss"] == pytest.approx(
            sum(s["eval_loss"] * s["eval_tokens"] for s in sets.values()) / record["eval_tokens"], rel=1e-12)

    # A checkpoint saved with another blend is refused, naming the change.
    changed = train(blend_config(assets, replay_corpus, resumed, max_steps=10,
                                 data_path=["0.5", str(assets.corpus), "0.5", str(replay_corpus)]),
                    workdir=tmp_path / "b")
    assert changed.returncode == 2, changed.output[-3000:]
    assert "the blend (corpus weight 0.7 -> 0.5, general weight 0.3 -> 0.5)" in changed.output

    # The plot: one PNG, one training curve per corpus and one eval curve per set.
    figure = plot_run(reference, tmp_path / "run.png")
    loss_axis, eval_axis = figure.axes[0], figure.axes[1]
    assert [line.get_label() for line in loss_axis.get_lines()] == ["all", "corpus", "general"]
    assert [line.get_label() for line in eval_axis.get_lines()] == ["corpus_b", "general"]
    assert [list(line.get_xdata()) for line in eval_axis.get_lines()] == [[0, 4, 8], [0, 4, 8]]
    from PIL import Image

    pixels = np.asarray(Image.open(tmp_path / "run.png").convert("L"), dtype=np.float64)
    assert pixels.shape[0] > 300 and pixels.std() > 10  # not blank


def test_plot_draws_each_step_once_after_a_resume(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    rows = [{"step": 1, "loss": 3.0, "lr": 1.0, "tokens_per_second": 5.0, "tokens_seen": 10},
            {"step": 2, "loss": 2.5, "lr": 1.0, "tokens_per_second": 5.0, "tokens_seen": 20},
            {"step": 2, "loss": 2.4, "lr": 1.0, "tokens_per_second": 5.0, "tokens_seen": 20},  # the resumed run's
            {"step": 2, "eval_loss": 2.6, "sets": {}}]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 3, "lo')
    train_records, evals = read_records(out / "metrics.jsonl")
    assert [(r["step"], r["loss"]) for r in train_records] == [(1, 3.0), (2, 2.4)]
    assert [r["step"] for r in evals] == [2]


def test_world_size_change_with_a_blend_keeps_the_position(assets, replay_corpus, tmp_path):
    def make(assets_, out, **overrides):
        return blend_config(assets_, replay_corpus, out, **overrides)

    reference, out, _ = change_world_size(make, assets, tmp_path, deepspeed=str(assets.ds["zero2_ga2"]))
    ours, theirs = metrics(out), metrics(reference)
    assert [(r["consumed_samples"], r["epochs"]) for r in ours if "loss" in r] == \
        [(r["consumed_samples"], r["epochs"]) for r in theirs if "loss" in r]
    assert [r["corpora"][name]["tokens"] for r in ours if "loss" in r for name in ("corpus", "general")] == \
        [r["corpora"][name]["tokens"] for r in theirs if "loss" in r for name in ("corpus", "general")]
    assert_same_curve_to_float_rounding(out, reference)


def test_evaluate_tool_refuses_a_set_named_twice(assets, tmp_path):
    done = launch(["--model", str(assets.base_model), "--data", f"x={assets.corpus}", "--data", f"x={assets.corpus_b}"],
                  workdir=tmp_path, ranks=1, script=REPO / "tools" / "evaluate.py")
    assert done.returncode == 2 and "--data names the set 'x' twice" in done.output, done.output[-2000:]
