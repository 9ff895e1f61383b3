"""Test driver: train like train.py, but poison the loss with NaN on one rank at one step.

    deepspeed ... tests/drivers/nan_run.py --config RUN.json --report R.json --nan_at_step 3 --nan_rank 1

Reports how many optimizer steps DeepSpeed took and whether the live weights still equal the last
checkpoint's, i.e. that the failing step changed nothing.
"""

import json
import sys
from pathlib import Path

import torch

from cpt_ds.config import RunConfig
from cpt_ds.distributed import exit_process
from cpt_ds.export import trained_state_dict
from cpt_ds.trainer import NonFiniteLossError, Trainer


def take(argv: list[str], flag: str) -> str:
    index = argv.index(flag)
    value = argv[index + 1]
    del argv[index: index + 2]
    return value


def main() -> int:
    argv = sys.argv[1:]
    report = Path(take(argv, "--report"))
    nan_at_step, nan_rank = int(take(argv, "--nan_at_step")), int(take(argv, "--nan_rank"))
    trainer = Trainer(RunConfig.load(argv))
    clean = trainer.forward

    def poisoned(batch, labels):
        output = clean(batch, labels)
        if trainer.step + 1 == nan_at_step and trainer.rank == nan_rank:
            output.loss = output.loss * float("nan")
        return output

    trainer.forward = poisoned
    try:
        trainer.train()
    except NonFiniteLossError as error:
        print(f"rank {trainer.rank}: {error}", flush=True)
        if trainer.rank == 0:
            saved = trained_state_dict(trainer.output_dir / f"step-{nan_at_step - 1:08d}", exclude_frozen=False)
            live = dict(trainer.engine.module.named_parameters())
            report.write_text(json.dumps({
                "optimizer_steps": trainer.engine.global_steps,
                "weights_equal_step_2_checkpoint": all(torch.equal(live[n].detach(), t) for n, t in saved.items()),
            }))
        trainer.close()
        return 1
    trainer.close()
    return 0


if __name__ == "__main__":
    exit_process(main())
