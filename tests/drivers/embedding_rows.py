"""Test driver: build the run's engine like train.py (no step), then save the embedding rows.

    deepspeed ... tests/drivers/embedding_rows.py --config RUN.json --rows ROWS.pt

Rank 0 writes every embedding and head weight by name (gathered under ZeRO-3) to ROWS.pt.
"""

import sys
from pathlib import Path

import torch

from cpt_ds.config import RunConfig
from cpt_ds.distributed import exit_process
from cpt_ds.trainer import Trainer


def main() -> int:
    import deepspeed

    argv = sys.argv[1:]
    rows_path = Path(argv[argv.index("--rows") + 1])
    del argv[argv.index("--rows"): argv.index("--rows") + 2]
    trainer = Trainer(RunConfig.load(argv))
    module = trainer.engine.module
    rows = {}
    # Full runs: embed_tokens / lm_head; LoRA runs: peft's frozen original_module and trained copies too.
    for name, parameter in module.named_parameters():
        if "embed_tokens" in name or "lm_head" in name:
            with deepspeed.zero.GatheredParameters([parameter]):
                rows[name] = parameter.detach().cpu().clone()
    if trainer.rank == 0:
        torch.save(rows, rows_path)
    trainer.close()
    return 0


if __name__ == "__main__":
    exit_process(main())
