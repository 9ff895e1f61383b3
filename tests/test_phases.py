"""Campaign phases: data positions continuing across phases, the plan's past fixed and its future editable at
resume, branches from another run's checkpoint, "phase" in the records and the plot, config errors."""

from __future__ import annotations

import copy
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from cpt_ds.campaign import plan_changes, resume_problems
from cpt_ds.config import RunConfig
from cpt_ds.data.blend import PhaseBlend
from cpt_ds.data.phased import PhasedOrder

from conftest import REPO, metrics, run_config, train

sys.path.insert(0, str(REPO / "tools"))
from plot_run import phase_spans, plot_run, read_records  # noqa: E402

STEPS = 8  # stable 4 + anneal 4; 8 samples per step (micro 4 x 2 ranks)


# --------------------------------------------------------------------------------------------------
# The data layer: positions continue across phases (no launch)
# --------------------------------------------------------------------------------------------------


def test_a_component_continues_across_phases_each_sample_once_per_epoch():
    sizes = [23, 11, 7]
    phases = [PhaseBlend("stable", 5, (0, 1), (0.75, 0.25)), PhaseBlend("anneal", 3, (2, 0), (0.5, 0.5)),
              PhaseBlend("tail", 4, (0,), None), PhaseBlend("again", 6, (1, 0, 2), (0.2, 0.3, 0.5))]
    order = PhasedOrder(phases, sizes, seed=3, global_batch_size=4)
    total = 4 * sum(phase.steps for phase in phases)
    ids = order.ids(0, total)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    for component, size in enumerate(sizes):
        drawn = ids[(ids >= offsets[component]) & (ids < offsets[component + 1])] - offsets[component]
        assert len(drawn) == order.counts(total)[component]
        # Across every phase boundary: each full epoch of the component is a permutation, the partial
        # last one repeats nothing.
        for start in range(0, len(drawn), size):
            epoch = drawn[start:start + size].tolist()
            assert len(set(epoch)) == len(epoch) and (len(epoch) < size or sorted(epoch) == list(range(size)))
    # Phase by phase, each position's component follows that phase's blend, so the phases' shares hold.
    assert order.counts(20).tolist() == [15, 5, 0]  # stable: 20 positions at 0.75 / 0.25
    assert (order.counts(32) - order.counts(20)).tolist() == [6, 0, 6]  # anneal: 12 at 0.5 / 0.5
    # Random access == sequential; and the order is a pure function of the plan (a fresh object agrees).
    assert np.array_equal(np.concatenate([order.ids(i, i + 3) for i in range(0, total, 3)])[:total], ids)
    assert np.array_equal(PhasedOrder(phases, sizes, seed=3, global_batch_size=4).ids(17, 61), ids[17:61])
    # A later phase edited does not move a single position before it.
    edited = PhasedOrder(phases[:2] + [PhaseBlend("tail", 9, (1,), None)], sizes, seed=3, global_batch_size=4)
    assert np.array_equal(edited.ids(0, 32), ids[:32])
    assert [order.phase_name(step) for step in (1, 5, 6, 8, 9, 12, 13, 18)] == \
        ["stable", "stable", "anneal", "anneal", "tail", "tail", "again", "again"]
    assert order.active(0) == order.active(20) == [0, 1] and order.active(21) == [0, 1, 2]


def test_component_starts_need_no_index_of_the_run():
    """Resuming a plan of many phases at position 10^12 costs O(components x phases)."""
    phases = [PhaseBlend(f"p{i}", 10**9, (i % 3, (i + 1) % 3), (0.6, 0.4)) for i in range(40)]
    order = PhasedOrder(phases, [1_000_003, 999_983, 500_009], seed=1, global_batch_size=1024)
    position = 10**12 + 12_345
    ids = order.ids(position, position + 64)
    assert len(ids) == 64 and int(order.counts(position).sum()) == position


# --------------------------------------------------------------------------------------------------
# Config errors
# --------------------------------------------------------------------------------------------------


def config_problems(**values) -> list[str]:
    return RunConfig.from_flat({"tokenizer_name_or_path": "t", "full_finetuning": True, **values}).config_problems()


def test_phase_config_errors():
    good = [{"name": "stable", "steps": 800, "data_path": ["0.75", "d/zh", "0.25", "d/en"]},
            {"name": "anneal", "steps": 200, "data_path": ["d/hq"]}]
    config = RunConfig.from_flat({"tokenizer_name_or_path": "t", "full_finetuning": True, "phases": good})
    assert config.config_problems() == [] and config.train.max_steps == 1000
    assert [c.name for c in config.data.components()[0]] == ["zh", "en", "hq"]
    assert config_problems(phases=good, max_steps=1000) == []
    assert config_problems(phases=good, max_steps=900) == [
        "max_steps 900 != 1000, the sum of the phases' steps (stable 800 + anneal 200): drop max_steps or make "
        "them agree"]
    assert config_problems(phases=good, data_path=["d/zh"]) == [
        "data_path and phases both name the training data: move data_path into the phases (each phase has its "
        "own data_path) or drop phases"]
    bad = [{"name": "stable", "steps": 0, "data_path": ["d/zh"]}, {"name": "stable", "steps": 5, "data_path": []},
           {"name": "", "steps": 2, "data_path": ["0.5", "d/zh", "x"], "lr": 1}]
    assert config_problems(phases=bad) == [
        "phases[0] 'stable': steps must be a positive integer, got 0",
        "phases[1] 'stable': data_path must be a non-empty list of prefixes (or weights and prefixes), got []",
        "phases[2]: unknown key 'lr' (a phase has name, steps and data_path)",
        "phases[2]: name must be a non-empty string, got ''",
        "phases: the name 'stable' is used twice; give each phase its own name"]
    assert "phases[0] 'a': data_path entry 3 'x' should be a weight before a prefix" in config_problems(
        phases=[{"name": "a", "steps": 1, "data_path": ["0.5", "d/zh", "x"]}])[0]
    with pytest.raises(ValueError, match="phases: must be a list of JSON objects"):
        RunConfig.from_flat({"phases": [5, "stable"]})
    from_command_line = RunConfig.load(["--tokenizer_name_or_path", "t", "--phases", json.dumps(good)])
    assert from_command_line.data.phases == good and from_command_line.train.max_steps == 1000


# --------------------------------------------------------------------------------------------------
# The resume rules, without ranks
# --------------------------------------------------------------------------------------------------


def component(name: str, weight: float | None, samples: int = 100) -> dict:
    return {"key": [f"/data/{name}"], "name": name, "num_samples": samples, "token_files": [f"sha-{name}"],
            "split": f"split-{name}", "weight": weight}


def plan(*, stable=(4, [("zh", 0.75), ("en", 0.25)]), anneal=(4, [("hq", 0.5), ("zh", 0.5)]), extra=None,
         decay_steps=4, **settings) -> dict:
    phases, first = [], 0
    for name, spec in [("stable", stable), ("anneal", anneal)] + ([extra] if extra else []):
        steps, comps = spec
        phases.append({"name": name, "steps": steps, "first_step": first,
                       "components": [component(c, w) for c, w in comps]})
        first += steps
    schedule = {"learning_rate": 3e-3, "lr_scheduler_type": "wsd", "warmup_ratio": 0.05, "warmup_steps": 1,
                "min_lr_ratio": 0.0, "decay_steps": decay_steps, "decay_ratio": None, "decay_type": "1-sqrt",
                "total_steps": first}
    return {"phases": phases, "global_batch_size": 8, "schedule": schedule,
            "settings": {"weight_decay": 0.01, "seed": 7, **settings}}


def test_future_edits_are_accepted_and_listed():
    saved = plan()
    longer = plan(anneal=(6, [("hq", 0.5), ("zh", 0.5)]), decay_steps=6, extra=("tail", (2, [("zh", None)])))
    assert resume_problems(saved, longer, step=4) == []  # at the boundary: anneal has not begun
    assert plan_changes(saved, longer, step=4) == [
        "phase 'tail' (steps 11-12) added", "phase 'anneal' steps 4 -> 6", "decay_steps 4 -> 6 (learning rates of "
        "steps 1-4 unchanged)", "max_steps 8 -> 12 (learning rates of steps 1-4 unchanged)"]
    other_mix = plan(anneal=(4, [("hq2", 1.0)]))
    assert resume_problems(saved, other_mix, step=4) == []
    # Inside the anneal, it may get longer or shorter when its past LRs stay (no decay yet at step 5 ...).
    constant = plan(anneal=(4, [("hq", 0.5), ("zh", 0.5)]), decay_steps=1)
    assert resume_problems(constant, plan(anneal=(3, [("hq", 0.5), ("zh", 0.5)]), decay_steps=1), step=6) == []
    assert resume_problems(saved, plan(stable=(6, [("zh", 0.75), ("en", 0.25)]), decay_steps=4), step=4) == []
    assert resume_problems(None, None, step=3) == []


def test_past_edits_are_refused_naming_the_phase_and_field():
    saved = plan()
    assert resume_problems(saved, plan(stable=(4, [("zh", 0.5), ("en", 0.5)])), step=6) == [
        "phase 'stable' (steps 1-4), trained up to the checkpoint's step 6: data_path (zh weight 0.75 -> 0.5, "
        "en weight 0.25 -> 0.5)"]
    assert resume_problems(saved, plan(stable=(5, [("zh", 0.75), ("en", 0.25)])), step=6) == [
        "phase 'stable' (steps 1-4), trained up to the checkpoint's step 6: steps 4 -> 5 (a finished phase keeps "
        "its length)", "phase 'anneal' (steps 5-8): the learning rate of step 6 would change from 0.0015 to 0.003 "
        "(max_steps 8 -> 9)"]
    assert resume_problems(saved, plan(anneal=(1, [("hq", 0.5), ("zh", 0.5)]), decay_steps=1), step=6)[0] == (
        "phase 'anneal' (steps 5-8), trained up to the checkpoint's step 6: steps 4 -> 1 would end it at step 5, "
        "before the checkpoint's step 6")
    assert resume_problems(saved, plan(anneal=(4, [("hq", 0.5), ("en", 0.5)])), step=6) == [
        "phase 'anneal' (steps 5-8), trained up to the checkpoint's step 6: data_path (en added, zh removed)"]
    lr = resume_problems(saved, plan(decay_steps=3), step=6)
    assert lr == ["phase 'anneal' (steps 5-8): the learning rate of step 6 would change from 0.0015 to 0.003 "
                  "(decay_steps 4 -> 3)"]
    assert resume_problems(saved, plan(weight_decay=0.1), step=6) == [
        "phase 'anneal' (steps 5-8), in progress at the checkpoint's step 6: weight_decay 0.01 -> 0.1"]
    batch = copy.deepcopy(saved)
    batch["global_batch_size"] = 16
    assert resume_problems(saved, batch, step=2) == [
        "phase 'stable' (steps 1-4), in progress at the checkpoint's step 2: samples per step 8 -> 16 "
        "(micro-batch x accumulation x ranks)"]
    content = plan()
    content["phases"][0]["components"][1]["token_files"] = ["sha-other"]
    assert resume_problems(saved, content, step=3) == [
        "phase 'stable' (steps 1-4), trained up to the checkpoint's step 3: data_path (en token files changed)"]
    assert resume_problems(None, saved, step=3) == [
        "the checkpoint was saved by a run without phases and this config has phases: a plan's past is the same on "
        "both sides"]


# --------------------------------------------------------------------------------------------------
# 2 gloo ranks: the straight run, interrupted runs, a future edit, a branch, refused past edits
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus_c(assets, tmp_path_factory) -> Path:
    """A third corpus for the anneal: the last documents of the second half of the text."""
    from cpt_ds.pack.packing import PackOptions, pack_corpus

    root = tmp_path_factory.mktemp("hq")
    lines, num_chars = [], 0
    for line in (assets.root / "text" / "corpus_b.jsonl").read_text(encoding="utf-8").splitlines()[::-1]:
        if num_chars < 900:
            lines.append(line)
            num_chars += len(json.loads(line)["text"])
    (root / "hq.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    pack_corpus([root / "hq.jsonl"], assets.tokenizer, root / "hq", PackOptions(), workers=1)
    return root / "hq"


def campaign_config(assets, corpus_c: Path, out: Path, *, anneal=None, decay_steps=4, **overrides) -> dict:
    stable = {"name": "stable", "steps": 4, "data_path": ["0.75", str(assets.corpus), "0.25", str(assets.corpus_b)]}
    anneal = anneal or {"name": "anneal", "steps": 4, "data_path": ["0.5", str(corpus_c), "0.5", str(assets.corpus)]}
    config = run_config(assets, out, phases=[stable, anneal], lr_scheduler_type="wsd", decay_steps=decay_steps,
                        eval_data_path=[f"b={assets.corpus_b}"], max_eval_samples=4, eval_steps=4)
    del config["max_steps"], config["validation_split_percentage"], config["data_path"]
    config.update(overrides)
    return config


def stable_records(output_dir: Path) -> list[dict]:
    """metrics.jsonl without the fields that measure time or memory."""
    return [{k: v for k, v in r.items() if k not in ("tokens_per_second", "memory_gib", "mfu")}
            for r in metrics(output_dir)]


@pytest.fixture(scope="module")
def straight(assets, corpus_c, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("straight")
    done = train(campaign_config(assets, corpus_c, work / "out"), workdir=work).check()
    assert "phase stable: 4 steps, corpus 0.750, corpus_b 0.250" in done.output
    assert "phase anneal: 4 steps, hq 0.500, corpus 0.500" in done.output
    assert "step 5/8 | phase anneal | loss" in done.output
    return work / "out"


@pytest.fixture(scope="module")
def interrupted(assets, corpus_c, tmp_path_factory) -> Path:
    """The same plan stopped at the phase boundary (step 4), then inside the anneal (step 6), then finished."""
    work = tmp_path_factory.mktemp("interrupted")
    config = campaign_config(assets, corpus_c, work / "out")
    train({**config, "stop_at_step": 4}, workdir=work).check()
    second = train({**config, "stop_at_step": 6}, workdir=work).check()
    assert "resumed at step 4, consumed_samples 32" in second.output
    assert "the campaign's plan changed" not in second.output
    train(config, workdir=work).check()
    return work / "out"


def test_step_records_carry_the_phase_and_its_corpora(straight):
    records = [r for r in metrics(straight) if "loss" in r]
    assert [r["phase"] for r in records] == ["stable"] * 4 + ["anneal"] * 4
    assert [sorted(r["corpora"]) for r in records] == [["corpus", "corpus_b"]] * 4 + [["corpus", "corpus_b", "hq"]] * 4
    # Every sample of every step is from the phase's corpora: 8 samples x 32 labels.
    assert all(sum(c["tokens"] for c in r["corpora"].values()) == 8 * 32 for r in records)
    assert all(r["corpora"]["corpus_b"]["tokens"] == 0 for r in records[4:])
    assert all(r["corpora"]["hq"]["tokens"] > 0 for r in records[4:])
    # corpus continues where the stable phase left it: 24 of the first 32 positions, then half of the anneal's.
    assert records[3]["consumed_samples"] == 32 and records[-1]["consumed_samples"] == 64
    corpus_epochs = [r["epochs"]["corpus"] for r in records]
    assert corpus_epochs[-1] / corpus_epochs[3] == pytest.approx((24 + 16) / 24, rel=1e-12)
    assert "hq" not in records[3]["epochs"] and records[4]["epochs"]["hq"] > 0
    assert [e["step"] for e in metrics(straight) if "eval_loss" in e] == [0, 4, 8]
    assert all(list(e["sets"]) == ["b"] for e in metrics(straight) if "eval_loss" in e)


def test_plot_shades_the_phases(straight, tmp_path):
    train_records, _ = read_records(straight / "metrics.jsonl")
    assert phase_spans(train_records) == [("stable", 0, 4), ("anneal", 4, 8)]
    figure = plot_run(straight, tmp_path / "run.png")
    loss_axis = figure.axes[0]
    assert [patch.get_label() for patch in loss_axis.patches] == ["phase stable", "phase anneal"]
    assert [(patch.get_x(), patch.get_x() + patch.get_width()) for patch in loss_axis.patches] == [(0, 4), (4, 8)]
    assert [line.get_label() for line in loss_axis.get_lines()] == ["all", "corpus", "corpus_b", "hq"]


def test_stopped_at_the_boundary_and_inside_phase_two_resumes_bitwise(straight, interrupted):
    assert stable_records(interrupted) == stable_records(straight)


def test_a_future_edit_is_accepted_and_equals_the_edited_plan_from_step_0(assets, corpus_c, straight, tmp_path):
    """Trained to the boundary under another anneal (3 steps on hq alone, decay 3), resumed with the straight
    run's plan: the past matches (warmup + stable LRs, stable data), so the result is the straight run."""
    out = tmp_path / "out"
    old_anneal = {"name": "anneal", "steps": 3, "data_path": [str(corpus_c)]}
    train(campaign_config(assets, corpus_c, out, anneal=old_anneal, decay_steps=3, stop_at_step=4),
          workdir=tmp_path).check()
    resumed = train(campaign_config(assets, corpus_c, out), workdir=tmp_path).check()
    assert "the campaign's plan changed after step 4 (applied from there on): phase 'anneal' steps 3 -> 4; " \
           "phase 'anneal' data_path (corpus added, hq weight None -> 0.5); decay_steps 3 -> 4" in resumed.output
    assert stable_records(out) == stable_records(straight)


def hash_folder(folder: Path) -> dict[str, str]:
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def test_a_branch_from_another_runs_checkpoint_equals_the_straight_run(assets, corpus_c, straight, interrupted,
                                                                       tmp_path):
    before = hash_folder(interrupted)
    out = tmp_path / "branch"
    source = interrupted / "step-00000004"
    command = campaign_config(assets, corpus_c, out, resume_from_checkpoint=str(source), save_total_limit=2,
                              save_steps=1)
    first = train({**command, "stop_at_step": 6}, workdir=tmp_path).check()
    assert f"branching from {source.resolve()} (step 4)" in first.output
    # The same command again (a requeue): the branch continues from its own step 6, not from step 4.
    done = train(command, workdir=tmp_path).check()
    assert f"resuming from {out / 'step-00000006'}: this branch of {source} has already trained past it" in done.output
    assert "branching from" not in done.output
    assert hash_folder(interrupted) == before  # the source run's folder is only read
    records = stable_records(out)
    assert records[0] == {"step": 4, "branched_from": str(source.resolve())}
    assert records[1:] == [r for r in stable_records(straight) if r["step"] > 4]
    # Rotation and `latest` work in the branch's own folder.
    assert sorted(p.name for p in out.glob("step-*")) == ["step-00000007", "step-00000008"]
    assert (out / "latest").read_text() == "step-00000008"


@pytest.mark.parametrize("edit, message", [
    ({"phases_stable": ["0.5", "A", "0.5", "B"]},
     "phase 'stable' (steps 1-4), trained up to the checkpoint's step 6: data_path (corpus weight 0.75 -> 0.5, "
     "corpus_b weight 0.25 -> 0.5)"),
    ({"decay_steps": 3},
     "phase 'anneal' (steps 5-8): the learning rate of step 6 would change from 0.0015 to 0.003 (decay_steps 4 -> 3)"),
], ids=["data-of-a-finished-phase", "lr-before-the-checkpoint"])
def test_a_past_edit_is_refused(assets, corpus_c, interrupted, tmp_path, edit, message):
    source = interrupted / "step-00000006"
    config = campaign_config(assets, corpus_c, tmp_path / "out", resume_from_checkpoint=str(source),
                             decay_steps=edit.get("decay_steps", 4))
    if "phases_stable" in edit:
        config["phases"][0]["data_path"] = ["0.5", str(assets.corpus), "0.5", str(assets.corpus_b)]
    before = hash_folder(interrupted)
    refused = train(config, workdir=tmp_path)
    assert refused.returncode == 2, refused.output[-3000:]
    assert f"cannot resume from {source}: the config changes the plan before the checkpoint's step 6: {message}. " \
           "Only what comes after step 6 may change" in refused.output
    assert hash_folder(interrupted) == before
