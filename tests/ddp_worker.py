"""Worker for the 2-process DDP test: trains the demo samples and writes the losses (rank 0)."""

import json
import sys
import warnings
from pathlib import Path

from pixelrefer.training import Trainer
from tests.test_training import config, samples

if __name__ == "__main__":
    warnings.simplefilter("ignore", UserWarning)
    out = Path(sys.argv[1])
    trainer = Trainer(config(out, "ddp", batch_size=2, steps=3, save_every=100), samples())
    losses = trainer.run().losses
    if trainer.accelerator.is_main_process:
        (out / "losses.json").write_text(json.dumps(dict(losses=losses, processes=trainer.accelerator.num_processes)))
