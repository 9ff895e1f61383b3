"""Test driver: the full gradients of a run's first optimizer step, before the step is applied.

    deepspeed ... tests/drivers/sp_gradients.py --config RUN.json --report GRADS.pt

Runs the trainer's own forward/backward of step 1 (every micro-batch, its loss scale, DeepSpeed's
reduction across ranks), then rank 0 saves ``{parameter name: full fp32 gradient}`` and the step's
per-corpus sums, so runs with different rank layouts (sequence parallel or not) can be compared.
"""

import sys
from pathlib import Path

import torch

from cpt_ds.config import RunConfig
from cpt_ds.distributed import exit_process
from cpt_ds.trainer import Trainer


def main() -> int:
    from deepspeed.utils import safe_get_full_grad

    argv = sys.argv[1:]
    report_path = Path(argv[argv.index("--report") + 1])
    del argv[argv.index("--report"): argv.index("--report") + 2]
    trainer = Trainer(RunConfig.load(argv))
    sums = trainer.accumulate_gradients(trainer.loader.next_step())
    # Collective under ZeRO-3: every rank asks for every gradient.
    gradients = {name: safe_get_full_grad(parameter).detach().cpu().clone()
                 for name, parameter in trainer.engine.module.named_parameters() if parameter.requires_grad}
    if trainer.rank == 0:
        torch.save({"gradients": gradients, "sums": sums}, report_path)
    trainer.close()
    return 0


if __name__ == "__main__":
    exit_process(main())
