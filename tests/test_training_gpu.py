"""On a CUDA device: the paths the CPU suite cannot reach (bf16 autocast, gradient checkpointing, data workers
forked after CUDA is up, the embedded models on the GPU). Skipped without a GPU; run on one with `pytest -m gpu`."""

import numpy as np
import pytest
import torch

from tests.test_training import config, samples

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_bf16_with_gradient_checkpointing_trains_on_the_gpu(tmp_path):
    from pixelrefer.training import Trainer

    trainer = Trainer(config(tmp_path, "bf16", steps=12, batch_size=3, save_every=6, mixed_precision="bf16",
                             gradient_checkpointing=True, num_workers=2), samples())
    assert trainer.accelerator.device.type == "cuda"
    result = trainer.run()
    assert all(np.isfinite(result.losses)) and np.mean(result.losses[-3:]) < np.mean(result.losses[:3])
    model = trainer.accelerator.unwrap_model(trainer.model)
    assert next(model.parameters()).dtype == torch.float32, "autocast keeps float32 master weights"
    assert (result.final_dir / "model.safetensors").exists()


@pytest.mark.parametrize("name", ["shapes-tiny", "shapes-tiny-lite"])
def test_embedded_models_answer_the_same_on_the_gpu(name, scene):
    import pixelrefer
    from pixelrefer.inference import ask

    image, masks = scene
    answers = {}
    for device in ("cpu", "cuda"):
        model, processor = pixelrefer.load(name, device=device)
        answers[device] = [ask(model, processor, "Please describe <region> briefly.", image=image, masks=[mask]).text
                           for mask in masks.values()]
    assert answers["cuda"] == answers["cpu"]
