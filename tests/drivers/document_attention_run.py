"""Test driver: under the run's DeepSpeed setup (ZeRO-3 partitions every weight), score windows that
hold at least three documents, one cut by the window start, and each of their document fragments
run alone; report the largest difference of a position's loss between the two.

    deepspeed ... tests/drivers/document_attention_run.py --config RUN.json --report REPORT.json

Forwards run with gradients enabled and the engine in training mode, so gradient checkpointing (when
the config asks for it) is active. Every rank scores the same windows (ZeRO-3 forwards are collective).
"""

import json
import sys
from pathlib import Path

import numpy as np

from cpt_ds.attention import model_inputs
from cpt_ds.config import RunConfig
from cpt_ds.data.loader import collate
from cpt_ds.distributed import exit_process
from cpt_ds.trainer import Trainer


def main() -> int:
    argv = sys.argv[1:]
    report_path = Path(argv[argv.index("--report") + 1])
    del argv[argv.index("--report"): argv.index("--report") + 2]
    trainer = Trainer(RunConfig.load(argv))
    corpus = trainer.data.train[0]  # the one unweighted component of the run's data_path
    samples, stream, length = corpus.samples, corpus.stream, trainer.config.data.block_size
    chosen = []
    for index in range(len(samples)):
        starts = stream.document_starts(index * length, (index + 1) * length)
        if 0 not in starts and len(starts) >= 2:
            chosen.append(index)
        if len(chosen) == 2:
            break
    trainer.engine.train()
    worst, fragments, across = 0.0, 0, 0.0
    for index in chosen:
        sample = samples[index]
        batch = collate([sample])
        together = trainer.forward(batch, batch["labels"]).token_losses[0]
        inputs = model_inputs(batch, document_attention=False, implementation=trainer.attention_implementation,
                              device=trainer.device)
        plain = trainer.engine(**inputs, labels=batch["labels"]).token_losses[0]
        bounds = np.flatnonzero(sample["position_ids"] == 0).tolist() + [length]
        for start, stop in zip(bounds[:-1], bounds[1:]):
            alone = collate([{key: value[start:stop] for key, value in sample.items()}])
            inputs = model_inputs(alone, document_attention=False, implementation=trainer.attention_implementation,
                                  device=trainer.device)
            expected = trainer.engine(**inputs, labels=alone["labels"]).token_losses[0]
            worst = max(worst, float((together[start:stop] - expected).abs().max()))
            fragments += 1
        across = max(across, float((plain[bounds[1]:] - together[bounds[1]:]).abs().max()))
    if trainer.rank == 0:
        report_path.write_text(json.dumps({"windows": chosen, "fragments": fragments, "max_difference": worst,
                                           "attending_across_changes_by": across,
                                           "zero_stage": trainer.ds.zero_stage,
                                           "gradient_checkpointing": trainer.config.model.gradient_checkpointing}))
    trainer.close()
    return 0


if __name__ == "__main__":
    exit_process(main())
