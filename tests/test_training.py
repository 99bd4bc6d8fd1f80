"""Training loop: learning rates by module, exact resume, accumulation equivalence, bad records."""

import json
import re
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pixelrefer import InputError
from pixelrefer.demo import demo_scene
from pixelrefer.training import STAGE_LEARNING_RATES, TrainConfig, Trainer, parameter_groups, step_indices
from tests.conftest import tiny_overrides

ANSWERS = {"square": "red square", "disc": "green disc", "speck": "white dot"}


@dataclass
class DemoSample:
    """A record-like object: `load_media()` as `pixelrefer.data.Sample` has it."""

    name: str
    seed: int
    broken: bool = False

    @property
    def where(self):
        return f"demo:{self.name}-{self.seed}"

    def load_media(self):
        image, masks = demo_scene(seed=self.seed)
        mask = np.zeros_like(masks[self.name]) if self.broken else masks[self.name]
        text = [{"role": "user", "content": "What is <region>?"}, {"role": "assistant", "content": ANSWERS[self.name]}]
        return text, image, None, [mask]


def samples(count=6):
    return [DemoSample(name, seed) for seed in range(count // 3) for name in ANSWERS]


def config(tmp_path, name, **kwargs):
    overrides = tiny_overrides()
    base = dict(model="tiny", model_overrides=overrides, output_dir=str(tmp_path / name), steps=6, batch_size=2,
                save_every=2, lr_llm=1e-3, lr_projector=1e-3, lr_object_encoder=1e-3, seed=0)
    base.update(kwargs)
    return TrainConfig(**base)


def test_stage_learning_rates_and_frozen_vision_encoder(tmp_path):
    trainer = Trainer(config(tmp_path, "groups", lr_llm=None, lr_projector=None, lr_object_encoder=None), samples())
    rates = {g["name"]: g["initial_lr"] for g in trainer.optimizer.param_groups}  # "lr" is 0 at warm-up start
    assert rates["object_encoder"] == STAGE_LEARNING_RATES[1]["object_encoder"] == 1e-3
    assert rates["llm"] == rates["projector"] == 1e-5
    optimised = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    model = trainer.accelerator.unwrap_model(trainer.model)
    assert not any(id(p) in optimised for p in model.model.vision_model.parameters())
    assert TrainConfig(stage=2).learning_rates() == dict(STAGE_LEARNING_RATES[2], vision_encoder=None)


def test_unfrozen_vision_encoder_needs_its_own_learning_rate(tmp_path):
    unfrozen = dict(tiny_overrides(), freeze_vision_encoder=False)
    with pytest.raises(ValueError, match="lr_vision_encoder is not set"):
        Trainer(config(tmp_path, "v", model_overrides=unfrozen), samples())
    trainer = Trainer(config(tmp_path, "v2", model_overrides=unfrozen, lr_vision_encoder=1e-4), samples())
    rates = {g["name"]: g["initial_lr"] for g in trainer.optimizer.param_groups}
    assert rates["vision_encoder"] == 1e-4


def test_loss_goes_down(tmp_path):
    result = Trainer(config(tmp_path, "learn", steps=12, save_every=100), samples()).run()
    assert np.mean(result.losses[-3:]) < np.mean(result.losses[:3])
    assert (tmp_path / "learn" / "final" / "model.safetensors").exists()
    saved = TrainConfig.load(tmp_path / "learn" / "final" / "train_config.json")
    assert saved.steps == 12


def test_interrupted_run_resumes_to_identical_losses(tmp_path):
    full = Trainer(config(tmp_path, "full"), samples()).run().losses
    interrupted = Trainer(config(tmp_path, "resumed"), samples())
    interrupted.run(stop_after=3)  # dies after step 3; the last checkpoint is step 2
    state = json.loads((tmp_path / "resumed" / "checkpoints" / "step-0000002" / "trainer_state.json").read_text())
    assert state["step"] == 2
    resumed = Trainer(config(tmp_path, "resumed"), samples()).run().losses
    assert len(resumed) == len(full) == 6
    assert resumed == full, "resume must continue bit-identically in float32 on CPU"


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    big = Trainer(config(tmp_path, "big", batch_size=4, steps=3), samples()).run().losses
    accumulated = Trainer(config(tmp_path, "acc", batch_size=2, grad_accum=2, steps=3), samples()).run().losses
    np.testing.assert_allclose(accumulated, big, rtol=1e-5, atol=1e-6)


def test_step_indices_cover_every_sample_each_epoch():
    seen = step_indices(0, 6, seed=3, per_step=6)
    assert sorted(seen) == list(range(6))
    assert step_indices(2, 6, seed=3, per_step=4) == step_indices(2, 6, seed=3, per_step=4)


def test_bad_record_stops_training_naming_it_or_is_skipped_and_counted(tmp_path):
    data = samples() + [DemoSample("disc", 9, broken=True)]
    with pytest.raises(InputError, match=r"bad training record demo:disc-9"):
        Trainer(config(tmp_path, "strict", batch_size=7, steps=1), data).run()
    result = Trainer(config(tmp_path, "lenient", batch_size=7, steps=1, skip_bad=True), data).run()
    assert len(result.skipped) == 1 and "demo:disc-9" in result.skipped[0]


def test_resume_refuses_a_different_run(tmp_path):
    Trainer(config(tmp_path, "one"), samples()).run(stop_after=2)
    with pytest.raises(ValueError, match="different TrainConfig"):
        Trainer(config(tmp_path, "one", lr_llm=5e-4), samples()).run()


def test_train_config_round_trip_and_unknown_fields(tmp_path):
    cfg = config(tmp_path, "cfg")
    cfg.save(tmp_path / "c.json")
    assert TrainConfig.load(tmp_path / "c.json") == cfg
    (tmp_path / "bad.json").write_text(json.dumps({"stepz": 3}))
    with pytest.raises(ValueError, match="unknown TrainConfig fields"):
        TrainConfig.load(tmp_path / "bad.json")


def test_parameter_groups_reject_unknown_trainable_parameters():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="belongs to no optimizer group"):
        parameter_groups(model, STAGE_LEARNING_RATES[1], 0.0)


@pytest.mark.slow
def test_two_process_ddp_matches_one_process_with_the_same_global_batch(tmp_path):
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, ACCELERATE_USE_CPU="1", PYTHONPATH=str(root), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(port), str(root / "tests" / "ddp_worker.py"), str(tmp_path)]
    done = subprocess.run(command, env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ddp = json.loads((tmp_path / "losses.json").read_text())
    assert ddp["processes"] == 2
    single = Trainer(config(tmp_path, "single", batch_size=4, steps=3, save_every=100), samples()).run().losses
    # Same global batch and token-exact normalisation: only float summation order differs (gloo all-reduce).
    np.testing.assert_allclose(ddp["losses"], single, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["shapes-tiny", "shapes-tiny-lite"])
def test_the_shipped_models_were_trained_with_their_preset(name):
    """`pixelrefer train --preset NAME` is the recipe of the embedded checkpoint: its saved TrainConfig is the
    preset's, field for field (the output folder aside)."""
    import dataclasses

    from pixelrefer.inference import ASSETS
    from pixelrefer.training import MediaStage, TrainConfig, preset_config

    shipped = dataclasses.asdict(TrainConfig.load(ASSETS / name / "train_config.json"))
    preset = dataclasses.asdict(preset_config(name))
    assert {k: v for k, v in shipped.items() if k != "output_dir"} == {
        k: v for k, v in preset.items() if k != "output_dir"}
    # and it carries the loss history of every stage of that recipe, one loss per step
    config = preset_config(name)
    stages = {"vision_pretrain": config.vision_pretrain_steps, "llm_pretrain": config.llm_pretrain_steps,
              "": config.steps, **{MediaStage.folder(i): s.steps for i, s in enumerate(config.frozen_media_stages())}}
    for stage, steps in stages.items():
        path = ASSETS / name / (f"{stage}_loss_history.json" if stage else "loss_history.json")
        if steps:
            assert len(json.loads(path.read_text())) == steps, path
        else:
            assert not path.exists(), f"{path}: a stage the recipe does not run"


def test_presets_and_the_train_command_generate_shapesworld_and_train(tmp_path, capsys):
    from pixelrefer.cli import main
    from pixelrefer.training import TRAIN_PRESETS, preset_config

    assert preset_config("shapes-tiny-lite").framework == "object_only"
    assert set(TRAIN_PRESETS) == {"shapes-tiny", "shapes-tiny-lite"}
    with pytest.raises(KeyError, match="unknown training preset"):
        preset_config("shapes-huge")
    assert preset_config("shapes-tiny-lite").vision_pretrain_steps > 0, "the from-scratch recipe starts with stage 0"
    tiny = preset_config("shapes-tiny")
    assert (tiny.framework, tiny.weights_from, tiny.steps) == ("vision_object", "shapes-tiny-lite", 0)
    assert tiny.media_stages, "shapes-tiny starts from Lite's weights and has frozen-media stages of its own"
    out = tmp_path / "cli"
    # here the encoder stage 0 made keeps training in the main stage, on data with image multiple choice
    overrides = dict(tiny_overrides(), freeze_vision_encoder=False)
    code = main(["train", "--preset", "shapes-tiny-lite", "--set", f"output_dir={out}", "--set", "steps=2",
                 "--set", "vision_pretrain_steps=2", "--set", "lr_vision_encoder=2e-4", "--set", "batch_size=2",
                 "--set", "llm_pretrain_steps=2", "--set", "llm_pretrain_batch_size=2", "--set", "text_choice_records=4",
                 "--set", "task_weights={}",
                 "--set", 'shapesworld={"seed": 1, "num_images": 6, "num_videos": 2, "image_choice": true}',
                 "--set", 'media_stages=[{"steps": 2, "batch_size": 2, "shapesworld": '
                          '{"seed": 2, "num_images": 2, "num_videos": 1}}]',
                 "--set", f"model_overrides={json.dumps(overrides)}"])
    assert code == 0 and "2 steps" in capsys.readouterr().out
    assert len(json.loads((out / "media_stage" / "loss_history.json").read_text())) == 2
    assert '"task": "image_choice"' in (out / "shapesworld" / "train.json").read_text()
    assert len(json.loads((out / "final" / "loss_history.json").read_text())) == 2
    assert len(json.loads((out / "vision_pretrain" / "loss_history.json").read_text())) == 2
    from pixelrefer.training import loss_histories

    histories = loss_histories(out)  # every stage, in the order run, plotted beside the model
    assert list(histories) == ["vision_pretrain", "llm_pretrain", "final", "media_stage"]
    assert all(len(v) == 2 for v in histories.values())
    assert (out / "final" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    after_stage_0 = load_file(out / "vision_pretrain" / "vision_encoder.safetensors")
    final = load_file(out / "final" / "model.safetensors")
    moved = [name for name, tensor in after_stage_0.items()
             if not torch.equal(tensor, final[f"model.vision_model.{name}"])]
    assert len(moved) > len(after_stage_0) // 2
    # the LLM stage alone (no main step): a model to measure with `benchmarks/text_choice.py --model`
    code = main(["train", "--preset", "shapes-tiny-lite", "--set", f"output_dir={tmp_path / 'llm-only'}", "--set",
                 "steps=0", "--set", "vision_pretrain_steps=0", "--set", "llm_pretrain_steps=2", "--set",
                 "batch_size=2", "--set", 'shapesworld={"seed": 1, "num_images": 6, "num_videos": 2}',
                 "--set", "llm_pretrain_batch_size=2", "--set", "text_choice_records=0", "--set", "task_weights={}",
                 "--set", "media_stages=[]",
                 "--set", f"model_overrides={json.dumps(tiny_overrides())}"])
    assert code == 0 and "0 steps, " in capsys.readouterr().out
    assert (tmp_path / "llm-only" / "final" / "model.safetensors").exists()


def test_resume_refuses_a_checkpoint_of_a_different_model_shape(tmp_path):
    """A preset changed between runs (same TrainConfig) must not resume onto the old weights."""
    Trainer(config(tmp_path, "shape"), samples()).run(stop_after=2)
    saved = tmp_path / "shape" / "checkpoints" / "step-0000002" / "config.json"
    data = json.loads(saved.read_text())
    data["max_crop_pixels"] = 112 * 112
    saved.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"model config differs from the checkpoint's in \['max_crop_pixels'\]"):
        Trainer(config(tmp_path, "shape"), samples()).run()


def _train_command(config_path, **popen):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.Popen([sys.executable, "-m", "pixelrefer.cli", "train", "--config", str(config_path)],
                            env=env, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **popen)


@pytest.mark.slow
def test_training_killed_with_sigkill_resumes_to_identical_losses(tmp_path):
    """The process dies without warning (SIGKILL, mid-step or mid-save); rerunning the command finishes the run
    with the losses of a run that was never interrupted."""
    import signal
    import time

    shapes = dict(seed=5, num_images=10, num_videos=2)
    for name in ("whole", "killed"):
        config(tmp_path, name, steps=8, save_every=2, shapesworld=shapes).save(tmp_path / f"{name}.json")
    whole = _train_command(tmp_path / "whole.json")
    assert whole.wait(timeout=600) == 0, whole.stderr.read()[-3000:]

    killed = _train_command(tmp_path / "killed.json")
    checkpoints = tmp_path / "killed" / "checkpoints"
    deadline = time.monotonic() + 300
    while not (checkpoints / "step-0000002").exists():
        assert killed.poll() is None, "training ended before it could be killed"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=60)
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / "final").exists(), "the run finished before the kill: the test proves nothing"

    resumed = _train_command(tmp_path / "killed.json")
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()[-3000:]
    expected = json.loads((tmp_path / "whole" / "final" / "loss_history.json").read_text())
    got = json.loads((tmp_path / "killed" / "final" / "loss_history.json").read_text())
    assert len(expected) == 8
    assert got == expected, "a SIGKILLed run must resume bit-identically in float32 on CPU"


def test_bf16_autocast_trains_on_cpu(tmp_path):
    """The GPU recipe's mixed_precision="bf16" path (accelerate autocast) runs and keeps float32 master weights;
    one process can train in float32 before and after (accelerate's process-wide state is reset between them)."""
    plain = Trainer(config(tmp_path, "fp32-before", steps=1, save_every=100), samples()).run().losses
    trainer = Trainer(config(tmp_path, "bf16", steps=2, save_every=100, mixed_precision="bf16"), samples())
    assert trainer.accelerator.mixed_precision == "bf16"
    losses = trainer.run().losses
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert losses[0] != plain[0], "autocast must change the arithmetic"
    model = trainer.accelerator.unwrap_model(trainer.model)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    after = Trainer(config(tmp_path, "fp32-after", steps=1, save_every=100), samples())
    assert after.accelerator.mixed_precision == "no"
    assert after.run().losses == plain


def _shapes(tmp_path):
    from pixelrefer.data import generate_shapesworld, load_annotations

    paths = generate_shapesworld(tmp_path / "sw", seed=2, num_images=12, num_videos=1)
    return load_annotations(paths["train"], tmp_path / "sw")


@pytest.mark.slow
def test_stage0_pretrains_the_vision_encoder_on_object_categories(tmp_path):
    from pixelrefer.training import labelled_objects, pretrain_vision_encoder

    data = _shapes(tmp_path)
    chosen, attributes = labelled_objects(data)
    assert chosen and all(data[i].image is not None for i in chosen)
    assert set(attributes) == {"category", "colour"}, "colour too; size only where every object has one (parts have none)"
    assert attributes["category"] == sorted(set(attributes["category"])) and "red" in attributes["colour"]
    trainer = Trainer(config(tmp_path, "s0", vision_pretrain_steps=25, vision_pretrain_lr=3e-3, batch_size=4,
                             steps=1, save_every=100), data)
    model = trainer.accelerator.unwrap_model(trainer.model)
    before = {k: v.clone() for k, v in model.model.vision_model.state_dict().items()}
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    losses = trainer.pretrain_vision()
    assert torch.equal(torch.get_rng_state(), rng), "stage 0 must not move the global RNG (exact resumes)"
    assert len(losses) == 25 and np.mean(losses[-5:]) < np.mean(losses[:5])
    assert not any(p.requires_grad for p in model.model.vision_model.parameters()), "frozen again after stage 0"
    after = model.model.vision_model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    saved = tmp_path / "s0" / "vision_pretrain"
    assert json.loads((saved / "loss_history.json").read_text()) == losses
    again = Trainer(config(tmp_path, "s0", vision_pretrain_steps=25, vision_pretrain_lr=3e-3, batch_size=4,
                           steps=1, save_every=100), data)
    assert again.pretrain_vision() == [], "a finished stage 0 is loaded, not redone"
    reloaded = again.accelerator.unwrap_model(again.model).model.vision_model.state_dict()
    assert all(torch.equal(after[k], reloaded[k]) for k in after)
    with pytest.raises(ValueError, match="objects carry categories"):
        pretrain_vision_encoder(model, trainer.processor, samples(), steps=1, lr=1e-3, batch_size=2)


def test_vision_encoder_from_an_embedded_model(tmp_path):
    import pixelrefer

    donor, _ = pixelrefer.load("shapes-tiny")
    trainer = Trainer(config(tmp_path, "from", vision_encoder_from="shapes-tiny", steps=2), samples())
    model = trainer.accelerator.unwrap_model(trainer.model)
    expected = donor.model.vision_model.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in model.model.vision_model.state_dict().items())
    trainer.run()  # frozen (the preset's default): the encoder stays the donor's
    assert all(torch.equal(v, expected[k]) for k, v in model.model.vision_model.state_dict().items())
    narrow = dict(tiny_overrides(), vision_config=dict(donor.config.vision_config.to_dict(), hidden_size=32))
    with pytest.raises(ValueError, match=r"vision encoder differs from the model's in \[.*hidden_size"):
        Trainer(config(tmp_path, "bad", vision_encoder_from="shapes-tiny", model_overrides=narrow), samples())


def test_weights_from_another_framework(tmp_path, monkeypatch):
    import pixelrefer

    lite, _ = pixelrefer.load("shapes-tiny-lite")
    trainer = Trainer(config(tmp_path, "vo", weights_from="shapes-tiny-lite", framework="vision_object",
                             model_overrides={}, steps=1, lr_vision_encoder=1e-4), samples())
    model = trainer.accelerator.unwrap_model(trainer.model)
    assert not model.config.is_lite and model.config.object_time_embedding, "the donor's architecture, VO framework"
    assert (model.config.downscale_threshold, model.config.position_init_std) == (50, 3.0)
    donor = lite.state_dict()
    assert all(torch.equal(v, donor[k]) for k, v in model.state_dict().items()), "every tensor is the donor's"
    infusion = sorted(k for k in donor if ".infusion." in k)
    assert infusion and trainer.weights_copied == dict(kept=[], left_out=infusion), "only Lite's infusion stays out"
    saved = trainer.output / "saved"
    trainer.save_model(saved)
    again, _ = pixelrefer.load(saved)
    assert not again.config.is_lite and again.config.object_time_embedding

    from pixelrefer.training import architecture_of

    fresh = Trainer(config(tmp_path, "fresh", framework="object_only", model_overrides=architecture_of("shapes-tiny"),
                           steps=1, lr_vision_encoder=1e-4), samples())
    fresh_state = fresh.accelerator.unwrap_model(fresh.model).state_dict()
    with pytest.warns(UserWarning, match=r"has no \[.*infusion.*keep their initialisation"):
        back = Trainer(config(tmp_path, "lite", weights_from="shapes-tiny", framework="object_only",
                              model_overrides={}, steps=1, lr_vision_encoder=1e-4), samples())
    vo, _ = pixelrefer.load("shapes-tiny")
    state = back.accelerator.unwrap_model(back.model).state_dict()
    assert back.weights_copied["kept"] == infusion and back.weights_copied["left_out"] == []
    assert all(torch.equal(state[k], fresh_state[k]) for k in infusion), "the infusion keeps its seeded start"
    assert all(torch.equal(state[k], v) for k, v in vo.state_dict().items())

    with pytest.raises(ValueError, match=r"weights_from='shapes-tiny-lite': its text_config differs .*hidden_size"):
        Trainer(config(tmp_path, "narrow", weights_from="shapes-tiny-lite"), samples())  # tiny_overrides win
    with pytest.raises(ValueError, match=r"weights_from='nowhere' is neither an embedded model"):
        Trainer(config(tmp_path, "nowhere", weights_from="nowhere", model_overrides={}), samples())
    with pytest.raises(ValueError, match=r"but model=.* is a checkpoint already"):
        Trainer(config(tmp_path, "both", model=str(saved), weights_from="shapes-tiny-lite"), samples())

    def odd(source, **kwargs):  # no config makes a shared tensor another shape; a hand-edited checkpoint can
        donor, processor = pixelrefer.load(source, **kwargs)
        if source == "shapes-tiny-lite":
            donor.model.object_tokenizer.time_embedding.proj = torch.nn.Linear(3, 128, bias=False)
        return donor, processor

    monkeypatch.setattr("pixelrefer.training.load", odd)
    with pytest.raises(ValueError, match=r"tensors of other shapes: \[.*time_embedding.proj.weight \(128, 3\) -> "):
        Trainer(config(tmp_path, "odd", weights_from="shapes-tiny-lite", framework="vision_object",
                       model_overrides={}, steps=1, lr_vision_encoder=1e-4), samples())


def test_workers_encode_ahead_with_the_same_batches_and_skips(tmp_path):
    data = samples() + [DemoSample("disc", 9, broken=True)]
    inline = Trainer(config(tmp_path, "inline", batch_size=3, steps=4, skip_bad=True, save_every=100), data).run()
    ahead = Trainer(config(tmp_path, "ahead", batch_size=3, steps=4, skip_bad=True, save_every=100, num_workers=2),
                    data).run()
    assert ahead.losses == inline.losses, "encoding in worker processes must not change the data or its order"
    assert ahead.skipped == inline.skipped and any("demo:disc-9" in s for s in ahead.skipped)
    with pytest.raises(InputError, match=r"bad training record demo:disc-9"):
        Trainer(config(tmp_path, "strict-ahead", batch_size=7, steps=1, num_workers=1), data).run()


def test_workers_do_not_change_the_trajectory_of_a_resume(tmp_path):
    Trainer(config(tmp_path, "mixed"), samples()).run(stop_after=2)
    resumed = Trainer(config(tmp_path, "mixed", num_workers=1), samples()).run()
    straight = Trainer(config(tmp_path, "straight", save_every=100), samples()).run()
    assert resumed.losses == straight.losses


def test_llm_stage_trains_the_llm_alone_on_lettered_text_questions(tmp_path):
    kwargs = dict(llm_pretrain_steps=30, llm_pretrain_lr=3e-3, batch_size=8, steps=1, save_every=100)
    trainer = Trainer(config(tmp_path, "llm", **kwargs), samples())
    model = trainer.accelerator.unwrap_model(trainer.model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(321)
    rng = torch.get_rng_state()
    losses = trainer.pretrain_llm()
    assert torch.equal(torch.get_rng_state(), rng), "the LLM stage must not move the global RNG (exact resumes)"
    assert len(losses) == 30 and np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("model.language_model.", "lm_head.")) for k in changed), \
        "only the LLM trains on text"
    assert any(k.startswith("model.language_model.layers.") for k in changed)
    if model.config.text_config.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()
    saved = tmp_path / "llm" / "llm_pretrain"
    assert json.loads((saved / "loss_history.json").read_text()) == losses
    again = Trainer(config(tmp_path, "llm", **kwargs), samples())
    assert again.pretrain_llm() == [], "a finished LLM stage is loaded, not redone"
    reloaded = again.accelerator.unwrap_model(again.model).state_dict()
    assert all(torch.equal(after[k], reloaded[k]) for k in changed)
    result = again.run()  # run() goes through both stages' folders, then trains
    assert len(result.losses) == 1


def test_llm_stage_batch_size_and_callback(tmp_path, monkeypatch):
    import pixelrefer.training as training

    drawn, seen = [], []
    real = training.pretrain_language_model

    def spy(*args, **kwargs):
        drawn.append(kwargs["batch_size"])
        return real(*args, **kwargs)

    monkeypatch.setattr(training, "pretrain_language_model", spy)
    trainer = Trainer(config(tmp_path, "batch", llm_pretrain_steps=3, llm_pretrain_batch_size=5, steps=1), samples())
    losses = trainer.pretrain_llm(lambda stage, step, loss: seen.append((stage, step, loss)))
    assert drawn == [5], "the LLM stage draws llm_pretrain_batch_size questions per step, not batch_size (2)"
    assert seen == [("llm_pretrain", step, loss) for step, loss in zip([1, 2, 3], losses)]
    drawn.clear()
    Trainer(config(tmp_path, "default", llm_pretrain_steps=1, steps=1), samples()).pretrain_llm()
    assert drawn == [2], "without llm_pretrain_batch_size the stage uses batch_size"


def test_a_stage_saved_on_the_way_replaces_the_folder_and_is_loaded_by_a_run(tmp_path):
    from safetensors.torch import load_file

    from pixelrefer.training import LLM_PREFIXES, save_stage

    trainer = Trainer(config(tmp_path, "saved", llm_pretrain_steps=2, steps=1), samples())
    model = trainer.accelerator.unwrap_model(trainer.model)
    folder = tmp_path / "saved" / "llm_pretrain"
    save_stage(folder, "language_model.safetensors", model, [1.0], LLM_PREFIXES)
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    save_stage(folder, "language_model.safetensors", model, [1.0, 0.5], LLM_PREFIXES)
    assert sorted(p.name for p in folder.parent.iterdir()) == ["llm_pretrain"], "no temporary folder is left"
    state = load_file(folder / "language_model.safetensors")
    assert set(state) == {k for k in model.state_dict() if k.startswith(LLM_PREFIXES)}
    assert torch.equal(state["lm_head.weight"], model.lm_head.weight.detach())
    assert json.loads((folder / "loss_history.json").read_text()) == [1.0, 0.5]
    again = Trainer(config(tmp_path, "saved", llm_pretrain_steps=2, steps=1), samples())
    assert again.pretrain_llm() == [], "the saved stage is loaded, not refit"
    loaded = again.accelerator.unwrap_model(again.model)
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_llm_stage_refuses_weights_of_another_model(tmp_path):
    from safetensors.torch import save_file

    folder = tmp_path / "other" / "llm_pretrain"
    folder.mkdir(parents=True)
    save_file({"lm_head.weight": torch.zeros(3, 3)}, folder / "language_model.safetensors")
    trainer = Trainer(config(tmp_path, "other", llm_pretrain_steps=2, steps=1), samples())
    with pytest.raises(ValueError, match="does not match the model"):
        trainer.pretrain_llm()


def test_task_weights_repeat_records_and_text_questions_join_the_pool(tmp_path):
    from pixelrefer.data.text_tasks import TextChoiceRecord
    from pixelrefer.training import weighted_pool

    data = samples()
    for sample, task in zip(data, ["a", "b", "a", "b", "a", "b"]):
        sample.task = task
    assert weighted_pool(data, {}) == list(range(6))
    assert weighted_pool(data, {"b": 3}) == [0, 1, 1, 1, 2, 3, 3, 3, 4, 5, 5, 5]
    with pytest.raises(ValueError, match=r"no training record has: \['c'\]"):
        weighted_pool(data, {"c": 2})
    with pytest.raises(ValueError, match="positive integer"):
        weighted_pool(data, {"a": 0.5})
    trainer = Trainer(config(tmp_path, "mix", text_choice_records=4, task_weights={"text_choice": 2}, batch_size=6,
                             steps=2, save_every=100), data)
    assert len(trainer.samples) == 10 and isinstance(trainer.samples[-1], TextChoiceRecord)
    assert len(trainer.pool) == 14
    seen = [trainer.pool[i] for step in range(3) for i in step_indices(step, 14, 0, 6)]
    assert {i for i in seen if i >= 6} == {6, 7, 8, 9}
    batches, skipped = trainer.step_batches(0)
    assert not skipped and batches[0]["input_ids"].shape[0] == 6
    assert len(trainer.run().losses) == 2, "image and text-only records train in one batch"
    again = TextChoiceRecord(0, 3).load_media()
    assert again == trainer.samples[9].load_media() and again[1:] == (None, None, [])


def test_loss_histories_come_in_stage_order_and_plot_one_panel_each(tmp_path):
    from pixelrefer.training import atomic_write_text, loss_histories
    from pixelrefer.visualize import plot_loss_histories

    for name, n in [("media_stage_10", 3), ("final", 60), ("media_stage", 1), ("media_stage_2", 2),
                    ("vision_pretrain", 4), ("unrelated", 5)]:
        (tmp_path / name).mkdir()
        atomic_write_text(tmp_path / name / "loss_history.json", json.dumps([1.0] * n))
    histories = loss_histories(tmp_path)
    assert list(histories) == ["vision_pretrain", "final", "media_stage", "media_stage_2", "media_stage_10"]
    assert [len(v) for v in histories.values()] == [4, 60, 1, 2, 3]
    fig = plot_loss_histories(histories)
    titles = [ax.get_title() for ax in fig.axes if ax.axison]
    assert titles == ["vision_pretrain", "main stage", "media_stage", "media_stage_2", "media_stage_10"]
    with pytest.raises(ValueError, match="no loss history"):
        plot_loss_histories({})


def test_media_stage_follows_a_finished_run_and_trains_the_llm_alone(tmp_path):
    from pixelrefer.training import MEDIA_STAGE

    plain = Trainer(config(tmp_path, "media", steps=2), samples())
    plain.run()
    main_stage = load_file(tmp_path / "media" / "final" / "model.safetensors")
    kwargs = dict(steps=2, media_stages=[dict(steps=12, lr=3e-3, batch_size=4, task_weights={"unused": 2})])
    staged = Trainer(config(tmp_path, "media", **kwargs), samples())
    result = staged.run()  # resumes at the last step, so only the frozen-media stage runs
    assert result.losses == plain.losses
    losses = json.loads((tmp_path / "media" / MEDIA_STAGE / "loss_history.json").read_text())
    assert len(losses) == 12
    final = load_file(tmp_path / "media" / "final" / "model.safetensors")
    changed = {k for k in main_stage if not torch.equal(main_stage[k], final[k])}
    assert changed and all(k.startswith(("model.language_model.", "lm_head.")) for k in changed)
    again = Trainer(config(tmp_path, "media", **kwargs), samples())
    assert again.media_stage() == [], "a finished frozen-media stage is loaded, not redone"
    reloaded = again.accelerator.unwrap_model(again.model).state_dict()
    assert all(torch.equal(final[k], reloaded[k]) for k in changed)


def test_media_stage_generates_its_own_shapesworld_once(tmp_path):
    trainer = Trainer(config(tmp_path, "own", media_stages=[
        dict(steps=1, shapesworld=dict(seed=4, num_images=2, num_videos=1))]), samples())
    records = trainer.media_stage_samples()
    assert records and any(r.is_video for r in records)
    written = (tmp_path / "own" / "media_stage_shapesworld" / "train.json").read_bytes()
    assert [r.id for r in trainer.media_stage_samples()] == [r.id for r in records]
    assert (tmp_path / "own" / "media_stage_shapesworld" / "train.json").read_bytes() == written


def test_media_stage_mixes_in_text_choice_records_option_first_with_its_shapesworld(tmp_path):
    """`text_choice_records`: that many text-only lettered questions join the stage's records (its own
    ShapesWorld's or the main stage's), option first when that ShapesWorld is; the stage caches and trains them
    (with `shuffle_options`, each drawn question's options dealt anew)."""
    from pixelrefer.training import MediaStage

    own = dict(steps=1, batch_size=4, text_choice_records=5, task_weights={"text_choice": 2}, shuffle_options=True,
               shapesworld=dict(seed=4, num_images=2, num_videos=1, image_choice=True, option_first=True))
    main = dict(steps=1, batch_size=4, text_choice_records=3, text_choice_context=4)
    trainer = Trainer(config(tmp_path, "text", media_stages=[own, main]), samples())
    records = trainer.media_stage_samples(0)
    texts = [r for r in records if r.task == "text_choice"]
    assert len(texts) == 5 and len(records) > 5 and all(r.option_first for r in texts)
    answer = texts[0].load_media()[0][-1]["content"]
    assert re.fullmatch(r"[^()]+ \([A-D]\)", answer), answer
    later = trainer.media_stage_samples(1)
    assert later[:len(trainer.samples)] == list(trainer.samples) and len(later) == len(trainer.samples) + 3
    added = later[len(trainer.samples):]
    assert [r.option_first for r in added] == [False] * 3
    assert [r.context_objects for r in added] == [4] * 3 and all(r.context_objects == 0 for r in texts)
    assert {r.seed for r in texts} != {r.seed for r in added}, "a stream per stage"
    assert len(trainer.media_stage(0)) == 1
    assert (tmp_path / "text" / MediaStage.folder(0) / "language_model.safetensors").exists()


def test_media_stages_run_in_order_and_one_can_scale_the_position_encoding(tmp_path):
    from pixelrefer.training import POSITION_LINEAR, MediaStage

    plain = Trainer(config(tmp_path, "two", steps=2), samples())
    plain.run()
    before = load_file(tmp_path / "two" / "final" / "model.safetensors")
    stages = [dict(steps=3, batch_size=2), dict(steps=2, batch_size=2, position_scale=4.0, mixed_precision="bf16")]
    staged = Trainer(config(tmp_path, "two", steps=2, media_stages=stages), samples())
    staged.run()
    assert [len(json.loads((tmp_path / "two" / MediaStage.folder(i) / "loss_history.json").read_text()))
            for i in range(2)] == [3, 2]
    assert MediaStage.folder(1) == "media_stage_2"
    final = load_file(tmp_path / "two" / "final" / "model.safetensors")
    weight = f"{POSITION_LINEAR}.weight"
    torch.testing.assert_close(final[weight], before[weight] * 4.0, rtol=0, atol=0)
    assert torch.equal(final[f"{POSITION_LINEAR}.bias"], before[f"{POSITION_LINEAR}.bias"])
    changed = {k for k in before if not torch.equal(before[k], final[k])}
    assert changed - {weight} and all(k.startswith(("model.language_model.", "lm_head.")) for k in changed - {weight})
    # a finished stage is loaded with its scaled weight, never scaled a second time
    again = Trainer(config(tmp_path, "two", steps=2, media_stages=stages), samples())
    assert again.media_stage(0) == [] and again.media_stage(1) == []
    model = again.accelerator.unwrap_model(again.model)
    assert torch.equal(model.model.object_tokenizer.position_proj.weight, final[weight])


def test_a_media_stage_can_train_the_object_mlp(tmp_path):
    from pixelrefer.cached_media import OBJECT_MLP
    from pixelrefer.training import POSITION_LINEAR, MediaStage

    plain = Trainer(config(tmp_path, "mlp", steps=2), samples())
    plain.run()
    before = load_file(tmp_path / "mlp" / "final" / "model.safetensors")
    stages = [dict(steps=4, batch_size=2, lr=3e-3, object_mlp_lr=3e-3, position_scale=2.0)]
    staged = Trainer(config(tmp_path, "mlp", steps=2, media_stages=stages), samples())
    staged.run()
    final = load_file(tmp_path / "mlp" / "final" / "model.safetensors")
    changed = {k for k in before if not torch.equal(before[k], final[k])}
    mlp = {k for k in before if k.startswith(OBJECT_MLP)}
    assert mlp and mlp <= changed, "every object MLP weight moved"
    assert changed - mlp - {f"{POSITION_LINEAR}.weight"}
    assert all(k.startswith(("model.language_model.", "lm_head.")) for k in changed - mlp - {f"{POSITION_LINEAR}.weight"})
    saved = load_file(tmp_path / "mlp" / MediaStage.folder(0) / "language_model.safetensors")
    assert mlp <= set(saved), "the stage saves the object MLP it trained"
    again = Trainer(config(tmp_path, "mlp", steps=2, media_stages=stages), samples())
    assert again.media_stage(0) == []
    reloaded = again.accelerator.unwrap_model(again.model).state_dict()
    assert all(torch.equal(final[k], reloaded[k]) for k in changed)


def test_a_media_stage_can_train_the_projector(tmp_path):
    from pixelrefer.cached_media import PROJECTOR
    from pixelrefer.training import VISION_MODEL, MediaStage

    plain = Trainer(config(tmp_path, "proj", steps=2), samples())
    plain.run()
    before = load_file(tmp_path / "proj" / "final" / "model.safetensors")
    stages = [dict(steps=3, batch_size=2, lr=3e-3, projector_lr=3e-3, vision_steps=2, vision_batch_size=2,
                   vision_shapesworld=dict(seed=3, num_images=5, num_videos=0))]
    Trainer(config(tmp_path, "proj", steps=2, media_stages=stages), samples()).run()
    final = load_file(tmp_path / "proj" / "final" / "model.safetensors")
    changed = {k for k in before if not torch.equal(before[k], final[k])}
    projector = {k for k in before if k.startswith(PROJECTOR)}
    assert projector and projector <= changed, "every projector weight moved"
    assert all(k.startswith(("model.language_model.", "lm_head.", PROJECTOR, VISION_MODEL)) for k in changed)
    saved = load_file(tmp_path / "proj" / MediaStage.folder(0) / "language_model.safetensors")
    assert projector <= set(saved), "the stage saves the projector it trained"
    lite = Trainer(config(tmp_path, "proj-lite", steps=2, framework="object_only",
                          media_stages=[dict(steps=1, projector_lr=1e-3)]), samples())
    with pytest.raises(ValueError, match=r"media_stages\[0\]: projector_lr trains the image projector, which an "
                                         r"object-only \(Lite\) model does not use"):
        lite.media_stage(0)


@pytest.mark.parametrize("spec, message", [
    ({"lr": 1e-3}, "'steps' is required"),
    ({"steps": 2, "epochs": 1}, r"unknown fields \['epochs'\]"),
    ({"steps": 0}, "steps must be a positive integer"),
    ({"steps": 2, "position_scale": 0}, "position_scale must be positive"),
    ({"steps": 2, "mixed_precision": "fp8"}, "mixed_precision must be 'no' or 'bf16'"),
    ({"steps": 2, "object_mlp_lr": 0}, "object_mlp_lr must be a positive number or None"),
    ({"steps": 2, "object_mlp_lr": "1e-3"}, "object_mlp_lr must be a positive number or None"),
    ({"steps": 2, "object_mlp_lr": 1e-3, "object_time_embedding": 0}, "object_time_embedding is the norm"),
    ({"steps": 2, "object_mlp_lr": 1e-3, "object_time_embedding": True}, "object_time_embedding is the norm"),
    ({"steps": 2, "object_time_embedding": 4.0}, "object_time_embedding trains with the object MLP"),
    ({"steps": 2, "projector_lr": -1e-3}, "projector_lr must be a positive number or None"),
    ("steps=2", "must be a dict"),
])
def test_a_bad_media_stage_is_named(spec, message):
    with pytest.raises(ValueError, match=r"media_stages\[1\]"):
        TrainConfig(media_stages=[{"steps": 1}, spec]).frozen_media_stages()
    with pytest.raises(ValueError, match=message):
        TrainConfig(media_stages=[{"steps": 1}, spec]).frozen_media_stages()


def test_train_configs_of_older_runs_load_their_single_media_stage(tmp_path):
    import dataclasses

    data = dataclasses.asdict(TrainConfig())
    data.pop("media_stages")
    legacy = dict(media_stage_steps=5, media_stage_lr=1e-3, media_stage_batch_size=8,
                  media_stage_shapesworld={"seed": 7}, media_stage_task_weights={"multiple_choice": 3})
    path = tmp_path / "train_config.json"
    path.write_text(json.dumps({**data, **legacy}))
    assert TrainConfig.load(path).media_stages == [
        dict(steps=5, lr=1e-3, batch_size=8, shapesworld={"seed": 7}, task_weights={"multiple_choice": 3})]
    path.write_text(json.dumps({**data, **legacy, "media_stage_steps": 0}))
    assert TrainConfig.load(path).media_stages == []
    path.write_text(json.dumps({**data, **legacy, "media_stages": []}))
    with pytest.raises(ValueError, match="both media_stages and the older"):
        TrainConfig.load(path)


def test_stage0_can_train_on_a_shapesworld_of_its_own(tmp_path):
    spec = dict(seed=3, num_images=5, num_videos=0)
    kwargs = dict(vision_pretrain_steps=2, vision_pretrain_lr=3e-3, batch_size=2, steps=1, save_every=100)
    with pytest.raises(ValueError, match="objects carry categories"):
        Trainer(config(tmp_path, "main-records", **kwargs), samples()).pretrain_vision()  # demo records have none
    trainer = Trainer(config(tmp_path, "own", vision_pretrain_shapesworld=spec, **kwargs), samples())
    records = trainer.vision_pretrain_samples()
    assert records and all(r.image is not None for r in records)
    written = (tmp_path / "own" / "vision_pretrain_shapesworld" / "train.json").read_bytes()
    assert len(trainer.pretrain_vision()) == 2
    assert (tmp_path / "own" / "vision_pretrain_shapesworld" / "train.json").read_bytes() == written, "generated once"
    assert trainer.samples == samples(), "the main stage keeps its own records"
    for bad, message in ((["seed", 3], "must be a dict"), ({"seeds": 3}, r"unknown generate_shapesworld arguments \['seeds'\]")):
        with pytest.raises(ValueError, match=f"vision_pretrain_shapesworld.*{message}"):
            Trainer(config(tmp_path, "bad", vision_pretrain_shapesworld=bad, **kwargs), samples()).vision_pretrain_samples()


def test_a_media_stage_can_continue_stage0_first_and_saves_the_encoder(tmp_path):
    from pixelrefer.cached_media import OBJECT_MLP
    from pixelrefer.training import VISION_MODEL, MediaStage

    plain = Trainer(config(tmp_path, "enc", steps=2), samples())
    plain.run()
    before = load_file(tmp_path / "enc" / "final" / "model.safetensors")
    stages = [dict(steps=3, batch_size=2, object_mlp_lr=3e-3, vision_steps=3, vision_batch_size=2,
                   vision_shapesworld=dict(seed=3, num_images=5, num_videos=0))]
    seen = []
    Trainer(config(tmp_path, "enc", steps=2, media_stages=stages), samples()).run(
        stage_callback=lambda stage, step, loss: seen.append((stage, step)))
    assert seen == [("media_stage_vision", 1), ("media_stage_vision", 2), ("media_stage_vision", 3),
                    ("media_stage", 1), ("media_stage", 2), ("media_stage", 3)], "stage 0 continues first"
    assert (tmp_path / "enc" / "media_stage_vision_shapesworld" / "train.json").exists()
    final = load_file(tmp_path / "enc" / "final" / "model.safetensors")
    changed = {k for k in before if not torch.equal(before[k], final[k])}
    assert any(k.startswith(VISION_MODEL) for k in changed) and any(k.startswith(OBJECT_MLP) for k in changed)
    saved = load_file(tmp_path / "enc" / MediaStage.folder(0) / "language_model.safetensors")
    assert {k for k in before if k.startswith(VISION_MODEL)} <= set(saved), "the stage saves the encoder it trained"
    assert not list((tmp_path / "enc").glob("*.partial")), "no stage checkpoint left once the stage is written"


@pytest.mark.parametrize("spec, message", [
    (dict(steps=1, vision_steps=-1), "vision_steps must be a non-negative integer"),
    (dict(steps=1, vision_batch_size=0), "vision_batch_size must be a positive integer"),
    (dict(steps=1, language_layers=-1), "language_layers must be a non-negative integer"),
    (dict(steps=1, language_layers=True), "language_layers must be a non-negative integer"),
    (dict(steps=1, text_choice_records=-2), "text_choice_records must be a non-negative integer"),
    (dict(steps=1, text_choice_records=4, text_choice_context=13),
     "text_choice_context must be an integer from 0 to 12"),
    (dict(steps=1, text_choice_context=3), "text_choice_context is the context of its text_choice_records"),
    (dict(steps=1, shuffle_options="yes"), "shuffle_options must be true or false"),
    (dict(steps=1, letter_weight=0), "letter_weight must be a positive number"),
    (dict(steps=1, letter_weight=True), "letter_weight must be a positive number"),
    (dict(steps=1, letter_drill=1.5), "letter_drill is a share of the drawn lettered questions"),
    (dict(steps=1, attention_heads=-1), "attention_heads must be a non-negative integer"),
    (dict(steps=1, vision_lr=0), "vision_lr must be a positive number"),
])
def test_bad_vision_fields_of_a_media_stage_are_named(spec, message):
    from pixelrefer.training import MediaStage

    with pytest.raises(ValueError, match=rf"media_stages\[0\]: {message}"):
        MediaStage.parse(spec, 0)
