"""Checkpoints inside stage 0, the LLM stage and the frozen-media stages: a run killed inside a stage
continues it exactly."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pixelrefer.stage_checkpoint import StageCheckpoint
from pixelrefer.training import LLM_PRETRAIN, PARTIAL, VISION_PRETRAIN, MediaStage, Trainer
from tests.test_training import _shapes, config, samples


class Killed(Exception):
    """Stands for the process dying after a step."""


def kill_at(stage: str, step: int):
    def callback(name, at, loss):
        if name == stage and at == step:
            raise Killed(f"{name} step {at}")
    return callback


def _state(folder):
    return torch.load(folder / "state.pt", weights_only=True)


def _interrupted_and_whole(tmp_path, stage, kill_step, data, **kwargs):
    """Run `kwargs`' config whole, and again killed after `kill_step` of `stage` then rerun; return both
    output folders and the killed run's checkpoint step."""
    Trainer(config(tmp_path, "whole", **kwargs), data).run()
    with pytest.raises(Killed):
        Trainer(config(tmp_path, "killed", **kwargs), data).run(stage_callback=kill_at(stage, kill_step))
    partial = tmp_path / "killed" / f"{stage}{PARTIAL}"
    saved_step = _state(partial)["step"]
    assert not (tmp_path / "killed" / stage).exists(), "a stage killed midway writes no stage folder"
    seen = []
    Trainer(config(tmp_path, "killed", **kwargs), data).run(stage_callback=lambda name, at, loss: seen.append((name, at)))
    assert not partial.exists(), "the stage's checkpoints are removed once its folder is written"
    return tmp_path / "whole", tmp_path / "killed", saved_step, seen


def _same_outputs(whole, killed, stage, filename):
    assert json.loads((killed / stage / "loss_history.json").read_text()) == \
        json.loads((whole / stage / "loss_history.json").read_text()), "same losses as a run never killed"
    a, b = load_file(whole / stage / filename), load_file(killed / stage / filename)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    a, b = load_file(whole / "final" / "model.safetensors"), load_file(killed / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_killed_inside_the_llm_stage_continues_it_exactly(tmp_path):
    kwargs = dict(llm_pretrain_steps=9, llm_pretrain_lr=3e-3, batch_size=4, steps=2, save_every=4)
    whole, killed, saved_step, seen = _interrupted_and_whole(tmp_path, LLM_PRETRAIN, 6, samples(), **kwargs)
    assert saved_step == 4
    assert [at for name, at in seen if name == LLM_PRETRAIN] == [5, 6, 7, 8, 9], "continues after the last save"
    _same_outputs(whole, killed, LLM_PRETRAIN, "language_model.safetensors")


def test_a_run_killed_inside_a_media_stage_continues_it_exactly(tmp_path):
    stages = [dict(steps=3, batch_size=2),
              dict(steps=7, batch_size=2, lr=3e-3, object_mlp_lr=3e-3, position_scale=2.0)]
    stage = MediaStage.folder(1)
    kwargs = dict(steps=2, save_every=2, media_stages=stages)
    whole, killed, saved_step, seen = _interrupted_and_whole(tmp_path, stage, 5, samples(), **kwargs)
    assert saved_step == 4
    assert [at for name, at in seen if name == stage] == [5, 6, 7]
    assert not [name for name, _ in seen if name == MediaStage.folder(0)], "a finished stage is loaded, not rerun"
    _same_outputs(whole, killed, stage, "language_model.safetensors")


@pytest.mark.slow
def test_a_run_killed_inside_stage0_continues_it_exactly(tmp_path):
    data = _shapes(tmp_path)
    kwargs = dict(vision_pretrain_steps=7, vision_pretrain_lr=3e-3, batch_size=4, steps=1, save_every=3)
    whole, killed, saved_step, seen = _interrupted_and_whole(tmp_path, VISION_PRETRAIN, 4, data, **kwargs)
    assert saved_step == 3
    assert [at for name, at in seen if name == VISION_PRETRAIN] == [4, 5, 6, 7]
    _same_outputs(whole, killed, VISION_PRETRAIN, "vision_encoder.safetensors")


def test_a_stage_checkpoint_of_other_settings_is_refused_by_name(tmp_path):
    kwargs = dict(llm_pretrain_steps=6, llm_pretrain_lr=3e-3, batch_size=4, steps=1, save_every=2)
    with pytest.raises(Killed):
        Trainer(config(tmp_path, "run", **kwargs), samples()).run(stage_callback=kill_at(LLM_PRETRAIN, 3))
    other = dict(kwargs, llm_pretrain_lr=1e-3)
    with pytest.raises(ValueError, match=r"llm_pretrain\.partial holds a checkpoint of this stage with other settings"):
        Trainer(config(tmp_path, "run", **other), samples()).run()


def test_stage_checkpoint_saves_and_restores_everything_a_stage_needs(tmp_path):
    def stage():
        torch.manual_seed(0)
        layer = torch.nn.Linear(3, 2)
        optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (1 + step))
        return layer, optimizer, scheduler

    def step(layer, optimizer, scheduler, sampler):
        x = torch.tensor(sampler.normal(size=(4, 3)), dtype=torch.float32) if isinstance(sampler, np.random.Generator) \
            else torch.randn(4, 3, generator=sampler)
        loss = layer(x).pow(2).mean() + torch.rand(()) * 0  # touches the global RNG too
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        return loss.item()

    for make in (lambda: np.random.default_rng(5), lambda: torch.Generator().manual_seed(5)):
        layer, optimizer, scheduler = stage()
        sampler = make()
        whole = [step(layer, optimizer, scheduler, sampler) for _ in range(6)]
        ckpt = StageCheckpoint(tmp_path / type(make()).__name__, every=3, fingerprint={"lr": 0.1})
        assert [ckpt.due(s, 6) for s in range(1, 7)] == [False, False, True, False, False, False]
        layer, optimizer, scheduler = stage()
        sampler = make()
        tensors = dict(layer.named_parameters())
        parts = dict(tensors=tensors, optimizer=optimizer, scheduler=scheduler, sampler=sampler)
        assert ckpt.restore(**parts) == (0, []), "nothing saved yet"
        first = [step(layer, optimizer, scheduler, sampler) for _ in range(3)]
        ckpt.save(3, first, **parts)
        layer, optimizer, scheduler = stage()  # a new process: fresh objects
        sampler = make()
        parts = dict(tensors=dict(layer.named_parameters()), optimizer=optimizer, scheduler=scheduler, sampler=sampler)
        start, losses = ckpt.restore(**parts)
        assert (start, losses) == (3, first)
        losses += [step(layer, optimizer, scheduler, sampler) for _ in range(3)]
        assert losses == whole
        assert not list(ckpt.folder.glob(".*tmp")), "no temporary file left behind"
        with pytest.raises(ValueError, match="does not match the stage's tensors"):
            ckpt.restore(**dict(parts, tensors={"weight": layer.weight}))
        ckpt.clear()
        assert not ckpt.folder.exists()
    with pytest.raises(ValueError, match="positive integer"):
        StageCheckpoint(tmp_path, every=0)


def test_a_run_killed_while_a_media_stage_continues_stage0_continues_exactly(tmp_path):
    stages = [dict(steps=3, batch_size=2, object_mlp_lr=3e-3, vision_steps=5, vision_batch_size=2,
                   vision_shapesworld=dict(seed=3, num_images=5, num_videos=0))]
    kwargs = dict(steps=2, save_every=2, media_stages=stages)
    stage = MediaStage.folder(0)
    whole, killed, saved_step, seen = _interrupted_and_whole(tmp_path, f"{stage}_vision", 3, samples(), **kwargs)
    assert saved_step == 2
    assert [(name, at) for name, at in seen] == [(f"{stage}_vision", 3), (f"{stage}_vision", 4), (f"{stage}_vision", 5),
                                                 (stage, 1), (stage, 2), (stage, 3)]
    _same_outputs(whole, killed, stage, "language_model.safetensors")
