"""Checkpoints inside the stages that run outside the main training loop.

Stage 0, the LLM stage and the frozen-media stages each run for up to an hour and a half on a CPU. Their
loops take a `StageCheckpoint`: every `every` steps it writes the tensors the stage trains, the optimizer, the
schedule, the stage's own sampler, the global torch RNG, the step and the losses to `folder/state.pt` (a
temporary file, then a rename, so a kill leaves the previous checkpoint whole). Started again with the same
`StageCheckpoint`, a stage continues where the last checkpoint left it: in float32 on a CPU the losses and the
weights are those of an uninterrupted run (tested). `fingerprint` (the stage's settings) is stored with the
state; a checkpoint written with other settings is refused, naming the folder and the settings that differ.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

STATE_FILE = "state.pt"


def sampler_state(sampler) -> object:
    """The state of a stage's sampler: a `torch.Generator` or a `numpy.random.Generator`."""
    if isinstance(sampler, torch.Generator):
        return sampler.get_state()
    if isinstance(sampler, np.random.Generator):
        return sampler.bit_generator.state
    raise TypeError(f"cannot checkpoint a sampler of type {type(sampler).__name__}")


def set_sampler_state(sampler, state) -> None:
    if isinstance(sampler, torch.Generator):
        sampler.set_state(state)
    elif isinstance(sampler, np.random.Generator):
        sampler.bit_generator.state = state
    else:
        raise TypeError(f"cannot restore a sampler of type {type(sampler).__name__}")


@dataclass
class StageCheckpoint:
    """Where and how often a stage saves its progress (see the module docstring).

    Attributes:
        folder: the stage's checkpoint folder (created on the first save).
        every: steps between saves; the last step is never saved here, the stage's own output takes over.
        fingerprint: JSON-like settings of the stage that a restored state must have been written with.
    """

    folder: Path
    every: int
    fingerprint: dict = field(default_factory=dict)

    def __post_init__(self):
        self.folder = Path(self.folder)
        if not isinstance(self.every, int) or self.every < 1:
            raise ValueError(f"StageCheckpoint.every must be a positive integer, got {self.every!r}")

    @property
    def path(self) -> Path:
        return self.folder / STATE_FILE

    def due(self, step: int, steps: int) -> bool:
        return step % self.every == 0 and step < steps

    def save(self, step: int, losses: list[float], *, tensors: dict[str, torch.Tensor], optimizer, scheduler,
             sampler) -> None:
        """Write the stage's state after `step` atomically."""
        state = dict(
            fingerprint=self.fingerprint,
            step=step,
            losses=list(losses),
            tensors={name: t.detach().clone() for name, t in tensors.items()},
            optimizer=optimizer.state_dict(),
            scheduler=scheduler.state_dict(),
            sampler=sampler_state(sampler),
            torch_rng=torch.get_rng_state(),
        )
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{STATE_FILE}.tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.path)

    def restore(self, *, tensors: dict[str, torch.Tensor], optimizer, scheduler, sampler) -> tuple[int, list[float]]:
        """Load the saved state into the stage's tensors, optimizer, schedule and sampler; returns (step, losses),
        (0, []) when nothing was saved."""
        if not self.path.exists():
            return 0, []
        state = torch.load(self.path, weights_only=True)
        if state["fingerprint"] != self.fingerprint:
            differing = sorted(k for k in state["fingerprint"].keys() | self.fingerprint.keys()
                               if state["fingerprint"].get(k) != self.fingerprint.get(k))
            raise ValueError(f"{self.folder} holds a checkpoint of this stage with other settings ({differing}); "
                             "remove that folder or use another output_dir")
        saved = state["tensors"]
        if saved.keys() != tensors.keys():
            raise ValueError(f"{self.path} does not match the stage's tensors: missing "
                             f"{sorted(tensors.keys() - saved.keys())[:5]}, unexpected {sorted(saved.keys() - tensors.keys())[:5]}")
        with torch.no_grad():
            for name, tensor in tensors.items():
                if saved[name].shape != tensor.shape:
                    raise ValueError(f"{self.path}: {name} has shape {tuple(saved[name].shape)}, the stage's "
                                     f"{tuple(tensor.shape)}")
                tensor.copy_(saved[name])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_sampler_state(sampler, state["sampler"])
        torch.set_rng_state(state["torch_rng"])
        return int(state["step"]), list(state["losses"])

    def clear(self) -> None:
        """Remove the folder once the stage's output is written."""
        shutil.rmtree(self.folder, ignore_errors=True)
