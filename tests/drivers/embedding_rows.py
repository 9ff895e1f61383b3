"""Test driver: build the run's engine like train.py (no step), then save the embedding rows.

    deepspeed ... tests/drivers/embedding_rows.py --config RUN.json --rows ROWS.pt

Rank 0 writes the whole input embedding and head (gathered under ZeRO-3) to ROWS.pt.
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
    for name, layer in (("embed_tokens", module.get_input_embeddings()), ("lm_head", module.get_output_embeddings())):
        with deepspeed.zero.GatheredParameters([layer.weight]):
            rows[name] = layer.weight.detach().cpu().clone()
    if trainer.rank == 0:
        torch.save(rows, rows_path)
    trainer.close()
    return 0


if __name__ == "__main__":
    exit_process(main())
