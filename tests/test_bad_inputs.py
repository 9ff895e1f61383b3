"""Bad inputs to the tools and the run config, as a careless or hostile user gives them: ONE table.

Each row builds its inputs under its own folder (the token files and tiny model of the session's
``assets``; the export rows copy one tiny finished run, trained once for the module), calls the tool's
``main(argv)`` in-process and asserts the exit code, the error line (one line, no traceback) and that
nothing was written or deleted anywhere the row can reach (its folder, the run, the assets).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from conftest import launch, run_config, write_config
from helpers_data import load_tool

RUN_STEP = "step-00000002"


@pytest.fixture(scope="module")
def finished_run(assets, tmp_path_factory) -> Path:
    """One tiny finished run (2 steps, 1 rank, exported to final/): the output_dir."""
    work = tmp_path_factory.mktemp("bad-inputs-run")
    config = run_config(assets, work / "out", max_steps=2, export_final=True)
    launch(["--config", str(write_config(config, work / "run.json"))], workdir=work, ranks=1).check()
    return work / "out"


@dataclass
class Ctx:
    work: Path
    assets: object
    run: Path | None

    def run_copy(self) -> Path:
        """A copy of the finished run that the row may damage: ``work/run``."""
        assert self.run is not None
        shutil.copytree(self.run, self.work / "run", symlinks=True)
        return self.work / "run"

    def token_file(self, name: str = "c", *, sidecar: bool = True) -> Path:
        """A copy of the assets' corpus token file as ``work/name``; returns the prefix."""
        source = Path(self.assets.corpus)
        for suffix in (".bin", ".idx", *((".json",) if sidecar else ())):
            shutil.copy2(f"{source}{suffix}", self.work / f"{name}{suffix}")
        return self.work / name

    def corrupt_ids(self, prefix: Path, position: int = 100, value: int = 65535) -> Path:
        """Overwrite one uint16 id (the sidecar's sha256 no longer matches)."""
        data = np.fromfile(f"{prefix}.bin", dtype=np.uint16)
        data[position] = value
        data.tofile(f"{prefix}.bin")
        return prefix

    def metrics(self, *lines: object) -> Path:
        """A run folder whose metrics.jsonl holds ``lines`` (records, raw text or raw bytes)."""
        run = self.work / "plotted"
        run.mkdir()
        (run / "metrics.jsonl").write_bytes(b"".join(
            line if isinstance(line, bytes) else (line if isinstance(line, str) else json.dumps(line)).encode() + b"\n"
            for line in lines))
        return run


@dataclass
class Row:
    id: str
    tool: str
    """``tools/NAME.py``, or ``train`` for train.py."""
    argv: Callable[[Ctx], list[str]]
    """Builds the row's inputs under ``ctx.work``; returns the command line."""
    message: str
    """A part of the error line."""
    code: int = 2
    needs_run: bool = False


TRAIN_STEP = {"step": 1, "loss": 3.0, "lr": 1e-3, "tokens_per_second": 5.0, "tokens_seen": 32}


def _export(ctx: Ctx, output: str | Path, *extra: str, checkpoint: Path | None = None) -> list[str]:
    return ["--checkpoint", str(checkpoint or ctx.run_copy()), "--output", str(output), *extra]


def _export_into_run(ctx: Ctx, relative: str, *extra: str) -> list[str]:
    run = ctx.run_copy()
    return _export(ctx, f"{run}/{relative}", *extra, checkpoint=run)


def _export_through_symlink(ctx: Ctx) -> list[str]:
    run = ctx.run_copy()
    (ctx.work / "link").symlink_to(run)
    return _export(ctx, ctx.work / "link", "--overwrite", checkpoint=run / RUN_STEP)


def _export_over(ctx: Ctx, make_target: Callable[[Path], None]) -> list[str]:
    run = ctx.run_copy()
    target = ctx.work / "target"
    make_target(target)
    return _export(ctx, target, "--overwrite", checkpoint=run)


def _folder_with_notes(target: Path) -> None:
    target.mkdir()
    (target / "notes.txt").write_text("mine")


def _previous_export_plus_a_file(ctx: Ctx) -> list[str]:
    shutil.copytree(ctx.run / "final", ctx.work / "target")
    (ctx.work / "target" / "notes.txt").write_text("mine")
    return ["--checkpoint", str(ctx.run_copy()), "--output", str(ctx.work / "target"), "--overwrite"]


def _damaged_shard(ctx: Ctx, *, truncate: bool) -> list[str]:
    run = ctx.run_copy()
    shard = run / RUN_STEP / "mp_rank_00_model_states.pt"
    data = bytearray(shard.read_bytes())
    if truncate:
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0xFF  # same size, one byte flipped: only the sha256 tells
    shard.write_bytes(bytes(data))
    return _export(ctx, ctx.work / "exported", checkpoint=run / RUN_STEP)


def _without_marker(ctx: Ctx) -> list[str]:
    run = ctx.run_copy()
    (run / RUN_STEP / "cpt_ds_complete.json").unlink()
    return _export(ctx, ctx.work / "exported", checkpoint=run / RUN_STEP)


def _previous_left_over(ctx: Ctx) -> list[str]:
    shutil.copytree(ctx.run / "final", ctx.work / "target")
    shutil.copytree(ctx.run / "final", ctx.work / "target.export-previous")
    return ["--checkpoint", str(ctx.run_copy()), "--output", str(ctx.work / "target"), "--overwrite"]


def _evaluate(ctx: Ctx, *data: str, extra: tuple[str, ...] = (), model: Path | None = None) -> list[str]:
    args = ["--model", str(model or ctx.assets.base_model)]
    for item in data or (str(ctx.token_file()),):
        args += ["--data", item]
    return [*args, "--block_size", "32", "--max_samples", "8", *extra]


def _config(ctx: Ctx, *argv: str, **fields) -> list[str]:
    path = write_config(run_config(ctx.assets, ctx.work / "out", **fields), ctx.work / "run.json")
    return ["--config", str(path), *argv]


def _raw_config(ctx: Ctx, content: bytes) -> list[str]:
    (ctx.work / "run.json").write_bytes(content)
    return ["--config", str(ctx.work / "run.json")]


ROWS = [
    # ---- export_hf: outputs that are, hold or lie inside the run; --overwrite of what export did not write
    Row("export-output-is-the-run-overwrite", "export_hf", lambda c: _export_into_run(c, ".", "--overwrite"),
        "is or holds the run folder", needs_run=True),
    Row("export-output-aliases-the-run", "export_hf",
        lambda c: _export_into_run(c, f"./{RUN_STEP}/../../run", "--overwrite"), "is or holds the run folder",
        needs_run=True),
    Row("export-output-symlink-to-the-run", "export_hf", _export_through_symlink, "is or holds the run folder",
        needs_run=True),
    Row("export-output-holds-the-run", "export_hf", lambda c: _export(c, c.work, "--overwrite"),
        "is or holds the run folder", needs_run=True),
    Row("export-output-is-the-checkpoint", "export_hf", lambda c: _export_into_run(c, RUN_STEP, "--overwrite"),
        "lies inside the run folder", needs_run=True),
    Row("export-output-new-folder-inside-the-run", "export_hf", lambda c: _export_into_run(c, "step-00000009"),
        "lies inside the run folder", needs_run=True),
    Row("export-overwrite-a-folder-export-did-not-write", "export_hf", lambda c: _export_over(c, _folder_with_notes),
        "is not a previous export", needs_run=True),
    Row("export-overwrite-a-previous-export-plus-a-file", "export_hf", _previous_export_plus_a_file,
        "holds notes.txt that no export wrote", needs_run=True),
    Row("export-overwrite-a-file", "export_hf", lambda c: _export_over(c, lambda t: t.write_text("x")),
        "is a file, not a folder export wrote", needs_run=True),
    Row("export-output-exists-without-overwrite", "export_hf",
        lambda c: _export_over(c, _folder_with_notes)[:-1], "already exists; choose another --output", needs_run=True),
    Row("export-previous-left-by-an-interrupted-overwrite", "export_hf", _previous_left_over,
        "left by an export interrupted while replacing", needs_run=True),
    # ---- export_hf: damaged or missing checkpoints
    Row("export-truncated-shard-with-marker", "export_hf", lambda c: _damaged_shard(c, truncate=True),
        "mp_rank_00_model_states.pt is", needs_run=True),
    Row("export-bit-flipped-shard-with-marker", "export_hf", lambda c: _damaged_shard(c, truncate=False),
        "(corrupted)", needs_run=True),
    Row("export-checkpoint-without-marker", "export_hf", _without_marker, "is incomplete", needs_run=True),
    Row("export-checkpoint-is-a-file", "export_hf",
        lambda c: (c.work.joinpath("f").write_text("x"), _export(c, c.work / "o", checkpoint=c.work / "f"))[1],
        "is a file; pass a step-NNNNNNNN folder"),
    Row("export-output-dir-without-checkpoints", "export_hf", lambda c: _export(c, c.work / "o", checkpoint=c.work),
        "holds no complete step-NNNNNNNN checkpoint"),
    # ---- evaluate
    Row("evaluate-ids-outside-the-vocabulary", "evaluate",
        lambda c: _evaluate(c, str(c.corrupt_ids(c.token_file()))), "inspect_corpus.py"),
    Row("evaluate-ids-outside-the-vocabulary-no-sidecar", "evaluate",
        lambda c: _evaluate(c, str(c.corrupt_ids(c.token_file(sidecar=False), position=7))),
        "inspect_corpus.py"),
    Row("evaluate-data-empty-name", "evaluate", lambda c: _evaluate(c, "=x"),
        "--data entry '=x' is not NAME=PREFIX: its NAME is empty"),
    Row("evaluate-data-empty-prefix", "evaluate", lambda c: _evaluate(c, "a="),
        "--data entry 'a=' is not NAME=PREFIX: its PREFIX is empty"),
    Row("evaluate-set-named-twice", "evaluate", lambda c: _evaluate(c, f"x={c.token_file()}", f"x={c.token_file('d')}"),
        "--data names the set 'x' twice"),
    Row("evaluate-model-missing", "evaluate", lambda c: _evaluate(c, model=c.work / "nope"), "does not exist"),
    Row("evaluate-model-is-a-checkpoint", "evaluate", lambda c: _evaluate(c, model=c.run / RUN_STEP),
        "is a training checkpoint; export it first", needs_run=True),
    Row("evaluate-model-without-config", "evaluate", lambda c: (c.work.joinpath("m").mkdir(), _evaluate(
        c, model=c.work / "m"))[1], "holds no config.json"),
    Row("evaluate-output-folder-missing", "evaluate", lambda c: _evaluate(c, extra=(
        "--output", str(c.work / "no" / "r.json"))), "does not exist; create it"),
    Row("evaluate-output-is-an-input", "evaluate",
        lambda c: _evaluate(c, str(c.token_file()), extra=("--output", str(c.work / "c.json"))),
        "is an input of this evaluation"),
    Row("evaluate-output-is-a-model-file", "evaluate",
        lambda c: _evaluate(c, extra=("--output", str(c.assets.base_model / "config.json"))),
        "is an input of this evaluation"),
    Row("evaluate-too-few-tokens", "evaluate", lambda c: _evaluate(c, extra=("--block_size", "10000000")),
        "hold fewer than block_size 10000000 + 1 tokens"),
    Row("evaluate-block-size-zero", "evaluate", lambda c: _evaluate(c, extra=("--block_size", "0")),
        "--block_size must be positive"),
    # ---- plot_run
    Row("plot-step-wrong-type", "plot_run", lambda c: [str(c.metrics(TRAIN_STEP, {**TRAIN_STEP, "step": "three"}))],
        "metrics.jsonl:2: field 'step' must be an integer, got \"three\""),
    Row("plot-field-missing", "plot_run",
        lambda c: [str(c.metrics({k: v for k, v in TRAIN_STEP.items() if k != "lr"}))],
        "metrics.jsonl:1: field 'lr' is missing"),
    Row("plot-eval-set-wrong-type", "plot_run",
        lambda c: [str(c.metrics(TRAIN_STEP, {"step": 1, "eval_loss": 2.0, "sets": {"a": {"eval_loss": "x"}}}))],
        "metrics.jsonl:2: field 'sets.a.eval_loss' must be a number"),
    Row("plot-record-not-an-object", "plot_run", lambda c: [str(c.metrics([1, 2], TRAIN_STEP))],
        "metrics.jsonl:1: is [1, 2], not a JSON object"),
    Row("plot-garbage-line", "plot_run", lambda c: [str(c.metrics("nonsense", TRAIN_STEP))],
        "metrics.jsonl:1: not a JSON record"),
    Row("plot-not-utf8", "plot_run", lambda c: [str(c.metrics(b"\xff\xfe"))], "not UTF-8 text"),
    Row("plot-missing-file", "plot_run", lambda c: [str(c.work / "nothing")], "metrics.jsonl not found"),
    Row("plot-no-records", "plot_run", lambda c: [str(c.metrics({"note": 1}))], "holds no training or eval records"),
    Row("plot-output-is-the-metrics", "plot_run",
        lambda c: [str(c.metrics(TRAIN_STEP)), "--output", str(c.work / "plotted" / "metrics.jsonl")],
        "is the metrics file it plots"),
    Row("plot-output-is-a-folder", "plot_run", lambda c: [str(c.metrics(TRAIN_STEP)), "--output", str(c.work)],
        "is a folder; pass a .png"),
    # ---- inspect_corpus
    Row("inspect-missing-prefix", "inspect_corpus", lambda c: [str(c.work / "none")], "token file index not found"),
    Row("inspect-truncated-bin", "inspect_corpus", lambda c: [str(_truncated(c.token_file()))], "(truncated)"),
    Row("inspect-decode-out-of-range", "inspect_corpus", lambda c: [str(c.token_file()), "--decode", "100000"],
        "document 100000 does not exist"),
    Row("inspect-verify-ids-outside-the-vocabulary", "inspect_corpus",
        lambda c: [str(c.corrupt_ids(c.token_file())), "--verify"], "has id 65535, outside the vocabulary [0, 512)"),
    Row("inspect-verify-bit-rot-inside-the-vocabulary", "inspect_corpus",
        lambda c: [str(c.corrupt_ids(c.token_file(), value=3)), "--verify"], "does not match the sidecar"),
    Row("inspect-verify-no-sidecar-no-vocab", "inspect_corpus",
        lambda c: [str(c.token_file(sidecar=False)), "--verify"],
        "vocabulary size is unknown"),
    Row("inspect-vocab-size-zero", "inspect_corpus", lambda c: [str(c.token_file()), "--verify", "--vocab-size", "0"],
        "--vocab-size must be positive"),
    # ---- train.py's run config
    Row("config-unknown-field-json", "train", lambda c: _config(c, learning_rat=1e-3),
        "learning_rat: unknown field; did you mean learning_rate?"),
    Row("config-unknown-field-flag", "train", lambda c: _config(c, "--learning_rat", "1e-3"),
        "learning_rat: unknown field; did you mean learning_rate?"),
    Row("config-retired-field", "train", lambda c: _config(c, "--dataset_dir", "x"), "dataset_dir: not a cpt-ds field"),
    Row("config-bad-type", "train", lambda c: _config(c, "--block_size", "big"), "block_size: must be an integer"),
    Row("config-eval-set-empty-name", "train", lambda c: _config(c, eval_data_path=["=x"]),
        "eval_data_path entry '=x' is not NAME=PREFIX: its NAME is empty"),
    Row("config-eval-set-empty-prefix", "train", lambda c: _config(c, eval_data_path=["a="]),
        "eval_data_path entry 'a=' is not NAME=PREFIX: its PREFIX is empty"),
    Row("config-file-missing", "train", lambda c: ["--config", str(c.work / "none.json")], "file not found"),
    Row("config-is-a-folder", "train", lambda c: ["--config", str(c.work)], "is a folder; pass the run configuration"),
    Row("config-not-json", "train", lambda c: _raw_config(c, b"{oops"), "not valid JSON"),
    Row("config-not-utf8", "train", lambda c: _raw_config(c, b'{"seed": "\xff"}'), "not valid JSON"),
    Row("config-not-an-object", "train", lambda c: _raw_config(c, b"[1]"), "must hold a JSON object"),
    Row("config-block-size-over-the-model", "train", lambda c: _config(c, block_size=4096),
        "block_size 4096 > the model's max_position_embeddings 128"),
    Row("config-max-steps-zero", "train", lambda c: _config(c, "--max_steps", "0"), "max_steps must be positive or -1"),
    Row("config-output-dir-is-a-file", "train", lambda c: (c.work.joinpath("out").write_text("x"), _config(c))[1],
        "output_dir: "),
]


def _truncated(prefix: Path) -> Path:
    data = Path(f"{prefix}.bin").read_bytes()
    Path(f"{prefix}.bin").write_bytes(data[:-2])
    return prefix


def listing(*roots: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``roots`` with size and mtime: what a row must leave as it was."""
    found = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                path = Path(dirpath, name)
                stat = path.lstat()
                found[str(path)] = (stat.st_size if not path.is_dir() else 0, stat.st_mtime_ns)
    return found


def call(tool: str, argv: list[str], monkeypatch) -> int:
    """The tool's ``main(argv)`` in this process; argparse's SystemExit gives its code."""
    if tool == "train":
        import cpt_ds.trainer
        import train

        # Every row fails in preflight, before any collective: no process group for this test process.
        monkeypatch.setattr(cpt_ds.trainer, "init_distributed", lambda *args: (0, 1, 0))
        main = train.main
    else:
        main = load_tool(tool).main
    try:
        return main(argv)
    except SystemExit as done:
        return done.code


@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
def test_bad_input(row: Row, assets, tmp_path, request, monkeypatch, capsys):
    monkeypatch.delenv("CPT_DS_DEBUG", raising=False)
    run = request.getfixturevalue("finished_run") if row.needs_run else None
    ctx = Ctx(work=tmp_path / "work", assets=assets, run=run)
    ctx.work.mkdir()
    argv = row.argv(ctx)
    watched = [ctx.work, Path(assets.root), *([run] if run else [])]
    before = listing(*watched)
    capsys.readouterr()
    code = call(row.tool, argv, monkeypatch)
    err = capsys.readouterr().err
    assert code == row.code, (code, err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if "error" in line]
    assert errors and row.message in err, err[-3000:]
    # The message is on the first error line; train.py's preflight lists its problems below that line.
    assert row.message in errors[0] or errors[0].endswith("invalid run configuration:"), err[-3000:]
    assert listing(*watched) == before


def test_the_table_covers_every_tool():
    assert {row.tool for row in ROWS} == {"export_hf", "evaluate", "plot_run", "inspect_corpus", "train"}
    assert len({row.id for row in ROWS}) == len(ROWS)


# ---- what the refusals must not break --------------------------------------------------------------------


def test_overwrite_replaces_a_previous_export_and_an_interrupted_export_leaves_nothing(finished_run, tmp_path,
                                                                                       monkeypatch, capsys):
    import cpt_ds.export

    export_hf = load_tool("export_hf").main
    run = shutil.copytree(finished_run, tmp_path / "run")
    out = tmp_path / "exported"
    # A leftover of an export killed mid-write (it holds the partial mark) is removed by the next export.
    partial = tmp_path / "exported.export-partial"
    partial.mkdir()
    (partial / cpt_ds.export.PARTIAL_MARKER).write_text("")
    assert export_hf(["--checkpoint", str(run), "--output", str(out)]) == 0
    info = json.loads((out / "cpt_ds_export.json").read_text())
    assert set(info["files"]) | {"cpt_ds_export.json"} == {p.name for p in out.iterdir()}
    assert "model.safetensors" in info["files"] and not partial.exists()

    # --overwrite replaces the previous export, here and in the run's own final/ (where train.py exports).
    assert export_hf(["--checkpoint", str(run), "--output", str(out), "--overwrite"]) == 0
    assert export_hf(["--checkpoint", str(run), "--output", str(run / "final"), "--overwrite"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported", "run"]

    # An export that fails while writing removes its partial folder and keeps the previous export.
    before = listing(tmp_path)

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(cpt_ds.export.shutil, "copy2", fail)
    with pytest.raises(OSError, match="disk full"):
        export_hf(["--checkpoint", str(run), "--output", str(out), "--overwrite"])
    assert listing(tmp_path) == before


def test_debug_flag_and_environment_show_the_traceback_and_keep_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("CPT_DS_DEBUG", raising=False)
    plot_run = load_tool("plot_run").main
    assert plot_run([str(tmp_path), "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.splitlines()[-1] == f"error: {tmp_path / 'metrics.jsonl'} not found; pass the " \
                                                          "output_dir of a train.py run"
    import train

    monkeypatch.setenv("CPT_DS_DEBUG", "1")
    assert train.main(["--learning_rat", "1"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "did you mean learning_rate?" in err.splitlines()[-1]
    monkeypatch.setenv("CPT_DS_DEBUG", "0")
    assert train.main(["--learning_rat", "1", "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err
    assert train.main(["--learning_rat", "1"]) == 2
    assert "Traceback" not in capsys.readouterr().err
