"""Run under torchrun by test_ddp.py: a tiny xkd run on 2 CPU processes.

Every rank dumps the weights it trained (before the best checkpoint is reloaded) to OUT/rank<r>.pt;
on ranks other than 0, any attempt to write a file atomically (os.replace) fails the run.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from xkd.engine.trainer import Trainer
from xkd.plan import load_config
from xkd.runner import run

out = Path(sys.argv[1])
overrides = sys.argv[2:]
rank = int(os.environ["RANK"])
trained: dict[str, dict[str, torch.Tensor]] = {}

original_restore = Trainer.restore


def capture_then_restore(self, which="best.pt"):
    trained[self.role] = {k: v.detach().clone() for k, v in self.distiller.trainable_modules().state_dict().items()}
    original_restore(self, which)


Trainer.restore = capture_then_restore

if rank != 0:

    def refuse(*args, **kwargs):
        raise AssertionError(f"rank {rank} tried to write {args[:2]}")

    os.replace = refuse

run_dir = run(load_config(None, overrides), progress=False)
torch.save(trained, out / f"rank{rank}.pt")
