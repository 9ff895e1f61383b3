"""Plot a run's metrics.jsonl as one PNG: training loss (global and per corpus), eval loss per set,
learning rate and tokens/s, against the step and against the tokens seen; a campaign's phases are shaded
and labelled on the step axes.

    python tools/plot_run.py OUTPUT_DIR [--output FILE.png]      (default OUTPUT_DIR/metrics.png)

Works on a run in progress and on resumed runs: a step logged twice (a run that died after logging
and was resumed from an earlier checkpoint) is drawn once, from its newest record. Needs matplotlib
(pip install 'cpt-ds[plot]'). A record missing a field the plot draws, or holding it with the wrong
type, is one error naming the file, line and field (exit 2; ``--debug``: with a traceback).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from cpt_ds.cli import UsageError, add_debug_flag, run_tool  # noqa: E402

# The fields the plot reads, with their types: a training record (it has "loss") and an eval record
# ("eval_loss"); and per record kind the optional dict of per-corpus / per-set entries and their field.
TRAIN_FIELDS = {"step": int, "loss": float, "lr": float, "tokens_per_second": float}
EVAL_FIELDS = {"step": int, "eval_loss": float}
NESTED = {"loss": ("corpora", "loss"), "eval_loss": ("sets", "eval_loss")}


def _type_problem(value: Any, expected: type) -> str | None:
    """Why ``value`` is not of the JSON type ``expected`` (float: any number, or null as train.py writes NaN)."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if (expected is float and (number or value is None)) or (expected is int and number and isinstance(value, int)) \
            or (expected is dict and isinstance(value, dict)):
        return None
    wanted = {int: "an integer", float: "a number", dict: "a JSON object"}[expected]
    return f"must be {wanted}, got {json.dumps(value)[:40]}"


def record_problem(record: Any) -> str | None:
    """What is wrong with one parsed line for the plot: a field it draws missing or of the wrong type."""
    if not isinstance(record, dict):
        return f"is {json.dumps(record)[:40]}, not a JSON object"
    kind = "eval_loss" if "eval_loss" in record else "loss" if "loss" in record else None
    if kind is None:
        return None  # not a record the plot draws
    fields = dict(EVAL_FIELDS if kind == "eval_loss" else TRAIN_FIELDS)
    if kind == "loss" and "tokens_seen" in record:
        fields["tokens_seen"] = float
    outer, inner = NESTED[kind]
    if outer in record:
        fields[outer] = dict
    for field, expected in fields.items():
        if field not in record:
            return f"field '{field}' is missing"
        if problem := _type_problem(record[field], expected):
            return f"field '{field}' {problem}"
    for name, entry in record.get(outer, {}).items():
        if not isinstance(entry, dict) or inner not in entry:
            return f"field '{outer}.{name}.{inner}' is missing"
        if problem := _type_problem(entry[inner], float):
            return f"field '{outer}.{name}.{inner}' {problem}"
    return None


def read_records(metrics: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(training records, eval records)`` in step order, one per step (the newest wins)."""
    train: dict[int, dict[str, Any]] = {}
    evals: dict[int, dict[str, Any]] = {}
    try:
        lines = metrics.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise UsageError(f"{metrics}: not UTF-8 text ({error.reason} at byte {error.start}); "
                         "is this a cpt-ds metrics.jsonl?") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                continue  # the last line of a run in progress may be half-written
            raise UsageError(f"{metrics}:{number}: not a JSON record; is this a cpt-ds metrics.jsonl?") from None
        if problem := record_problem(record):
            raise UsageError(f"{metrics}:{number}: {problem}; is this a cpt-ds metrics.jsonl?")
        if "eval_loss" in record:
            evals[record["step"]] = record
        elif "loss" in record:
            train[record["step"]] = record
    return [train[step] for step in sorted(train)], [evals[step] for step in sorted(evals)]


def tokens_seen_at(train: list[dict[str, Any]], step: int) -> float | None:
    """Tokens seen after ``step``, from the training records (linear between logged steps)."""
    points = [(r["step"], r["tokens_seen"]) for r in train if "tokens_seen" in r]
    if not points:
        return None
    if step <= points[0][0]:
        return points[0][1] * step / points[0][0] if points[0][0] else 0.0
    for (s0, t0), (s1, t1) in zip(points, points[1:]):
        if s0 <= step <= s1:
            return t0 + (t1 - t0) * (step - s0) / (s1 - s0)
    last_step, last_tokens = points[-1]
    return last_tokens * step / last_step


def run_title(output_dir: Path) -> str:
    """The figure's title: the run's folder name (``cpt``), not the whole path."""
    return output_dir.resolve().name


def plot_run(output_dir: Path, output: Path):
    """Write the PNG; returns the matplotlib figure (its axes carry one labelled line per curve)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("plot_run needs matplotlib: pip install 'cpt-ds[plot]'") from None
    metrics = output_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise UsageError(f"{metrics} not found; pass the output_dir of a train.py run")
    if output.is_dir() or output.resolve() == metrics.resolve():
        raise UsageError(f"--output {output} is {'a folder' if output.is_dir() else 'the metrics file it plots'}; "
                         "pass a .png file name")
    train, evals = read_records(metrics)
    if not train and not evals:
        raise UsageError(f"{metrics} holds no training or eval records yet")

    figure, axes = plt.subplots(2, 3, figsize=(16, 8.5))
    (loss_step, eval_step, lr_axis), (loss_tokens, eval_tokens, speed_axis) = axes
    _plot_training_loss(train, loss_step, loss_tokens)
    _plot_eval_loss(train, evals, eval_step, eval_tokens)
    steps = [r["step"] for r in train]
    lr_axis.plot(steps, [r["lr"] for r in train], label="learning rate", color="tab:purple")
    speed_axis.plot(steps, [r["tokens_per_second"] for r in train], label="tokens/s", color="tab:green")
    titles = {loss_step: ("training loss", "step"), loss_tokens: ("training loss", "tokens seen"),
              eval_step: ("eval loss per set", "step"), eval_tokens: ("eval loss per set", "tokens seen"),
              lr_axis: ("learning rate", "step"), speed_axis: ("tokens/s", "step")}
    for axis, (title, xlabel) in titles.items():
        if xlabel == "step":
            _shade_phases(train, axis)
        axis.set_title(title)
        axis.set_xlabel(xlabel)
        axis.grid(alpha=0.3)
        if axis.get_lines() or axis.patches:
            axis.legend(fontsize=8)
    figure.suptitle(run_title(output_dir))
    figure.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    temporary = output.with_name(output.name + ".tmp.png")
    figure.savefig(temporary, dpi=90)
    temporary.replace(output)
    return figure


def phase_spans(train: list[dict[str, Any]]) -> list[tuple[str, int, int]]:
    """``(name, first step, last step)`` of each phase of a campaign's records, in order (a span starts
    where the previous one ends); [] for a run without phases."""
    spans: list[tuple[str, int, int]] = []
    for record in train:
        name = record.get("phase")
        if name is None:
            continue
        if spans and spans[-1][0] == name:
            spans[-1] = (name, spans[-1][1], record["step"])
        else:
            spans.append((name, spans[-1][2] if spans else 0, record["step"]))
    return spans


def _shade_phases(train: list[dict[str, Any]], axis) -> None:
    """One shaded, labelled band per phase behind a step axis's curves."""
    for index, (name, start, stop) in enumerate(phase_spans(train)):
        axis.axvspan(start, stop, color=f"C{index % 10}", alpha=0.12, label=f"phase {name}", zorder=0)
        axis.annotate(name, xy=((start + stop) / 2, 1.0), xycoords=("data", "axes fraction"), ha="center",
                      va="top", fontsize=8)


def _plot_training_loss(train: list[dict[str, Any]], by_step, by_tokens) -> None:
    """The global training loss and, for a blend, one curve per corpus; against steps and tokens seen."""
    steps = [r["step"] for r in train]
    tokens = [r.get("tokens_seen") for r in train]
    has_tokens = bool(train) and all(value is not None for value in tokens)
    corpora = sorted({name for r in train for name in r.get("corpora", {})})
    for axis, xs in ((by_step, steps), (by_tokens, tokens if has_tokens else None)):
        if xs is None:
            continue
        axis.plot(xs, [r["loss"] for r in train], label="all", color="black", linewidth=1.6)
        if len(corpora) > 1:
            for name in corpora:
                points = [(x, r["corpora"][name]["loss"]) for x, r in zip(xs, train)
                          if r.get("corpora", {}).get(name, {}).get("tokens")]
                axis.plot([p[0] for p in points], [p[1] for p in points], label=name, linewidth=1.0)


def _plot_eval_loss(train: list[dict[str, Any]], evals: list[dict[str, Any]], by_step, by_tokens) -> None:
    """One eval-loss curve per set (or the total when the run has no named sets)."""
    sets = sorted({name for r in evals for name in r.get("sets", {})})
    eval_x_tokens = [tokens_seen_at(train, r["step"]) for r in evals]
    for axis, xs in ((by_step, [r["step"] for r in evals]),
                     (by_tokens, eval_x_tokens if all(x is not None for x in eval_x_tokens) else None)):
        if xs is None or not evals:
            continue
        for name in sets or ["all"]:
            points = [(x, r["sets"][name]["eval_loss"] if sets else r["eval_loss"]) for x, r in zip(xs, evals)
                      if not sets or name in r.get("sets", {})]
            axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3, label=name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir", type=Path, help="a train.py output_dir (holds metrics.jsonl)")
    parser.add_argument("--output", type=Path, default=None, help="PNG to write (default OUTPUT_DIR/metrics.png)")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    output = args.output or args.output_dir / "metrics.png"

    def plot() -> None:
        plot_run(args.output_dir, output)
        print(f"wrote {output}")

    return run_tool(plot, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
