"""The cpt-ds side of train_speed.py's eval-memory measurement: one rank.

    deepspeed ... benchmarks/_cpt_ds_eval.py --config RUN.json --warm_steps 2 --result OUT.json

Builds the real ``cpt_ds.trainer.Trainer`` from a run config, takes ``--warm_steps`` optimizer steps
(the baseline can only evaluate after training under ZeRO-1/2, so both sides evaluate a model that
has trained the same number of steps), then runs ``Trainer.evaluate_and_log()`` inside the same
peak-RSS probe as the baseline's ``trainer.evaluate()``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# benchmarks/ is sys.path[0] when the launcher runs this file, so the probe is shared with the baseline.
from harness import EvalMemoryProbe

from cpt_ds.distributed import exit_process


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="run configuration JSON (with eval_data_path)")
    parser.add_argument("--warm_steps", type=int, default=2)
    parser.add_argument("--result", required=True, help="JSON file this rank writes its numbers to")
    parser.add_argument("--local_rank", type=int, default=0, help="set by the deepspeed launcher")
    args = parser.parse_args()

    from cpt_ds.config import RunConfig
    from cpt_ds.trainer import Trainer

    trainer = Trainer(RunConfig.load(["--config", args.config]))
    try:
        assert trainer.data.eval_sets, "train_speed.py's eval run configs name eval data"
        for _ in range(args.warm_steps):
            trainer.train_step(trainer.loader.next_step(), trainer.lr(trainer.step))
            trainer.step += 1
        probe = EvalMemoryProbe()
        with probe:
            metrics = trainer.evaluate_and_log()
        eval_samples = sum(len(corpus.samples) for corpus in trainer.data.eval_sets)
        result = {"rank": trainer.rank, "world_size": trainer.world_size, "zero_stage": trainer.ds.zero_stage,
                  "precision": trainer.ds.precision, **probe.as_dict(), "eval_samples": eval_samples,
                  "eval_accuracy": metrics.accuracy, "eval_loss": metrics.loss}
        Path(args.result.format(rank=trainer.rank)).write_text(json.dumps(result, indent=2) + "\n")
    finally:
        trainer.close()
    return 0


if __name__ == "__main__":
    exit_process(main())
