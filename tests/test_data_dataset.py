"""RegionDataset: bad records raise with file and index or are skipped and counted; collate equals the batch path."""

import pytest
import torch

from pixelrefer import InputError, PixelReferProcessor
from pixelrefer.data import RegionDataset, collate, load_annotations
from pixelrefer.data.dataset import data_loader
from pixelrefer.regions import mask_to_rle
from tests.conftest import tiny_overrides
from tests.test_data_formats import (
    frame_masks, image_record, square_mask, video_record, write_frames, write_image, write_json,
)

FRAMES = [f"clip/frame_{t:02d}.png" for t in range(3)]


def processor(framework="vision_object"):
    return PixelReferProcessor.from_preset("tiny", framework=framework, **tiny_overrides())


def mixed_file(tmp_path, bad=()):
    """Records: image, video, image with two objects, unanswered image; indices in `bad` lose their image."""
    write_image(tmp_path / "img.png")
    write_frames(tmp_path / "clip")
    rle = mask_to_rle(square_mask())
    two = image_record(rle)
    two["conversations"][0]["value"] = "<image>\nCompare <region> with <region>."
    two["masks"].append(mask_to_rle(square_mask(24, 2, 30, 8)))
    unanswered = image_record(rle)
    del unanswered["conversations"][1]
    records = [image_record(rle), video_record(FRAMES, [frame_masks()], timestamps=[0, 0.5, 1]), two, unanswered]
    for index in bad:
        records[index]["image"] = "missing.png"
    return write_json(tmp_path / "mixed.json", records)


def test_bad_record_raises_naming_file_and_index(tmp_path):
    path = mixed_file(tmp_path, bad=(2,))
    dataset = RegionDataset(load_annotations(path), processor())
    assert len(dataset) == 4 and dataset[0].inputs["input_ids"].shape[0] == 1
    with pytest.raises(InputError, match=rf"{path}:2: image file .*missing.png does not exist"):
        dataset[2]


def test_skip_bad_leaves_out_and_counts_bad_records_never_substituting(tmp_path):
    path = mixed_file(tmp_path, bad=(0, 2))
    dataset = RegionDataset(load_annotations(path), processor(), skip_bad=True)
    assert [s.index for s in dataset.samples] == [1, 3]
    assert dataset.num_skipped == 2 and [p.index for p in dataset.skipped] == [0, 2]
    assert all("missing.png does not exist" in p.reason for p in dataset.skipped)
    assert dataset[0].inputs.get("pixel_values_videos") is not None  # item 0 is record 1, the video


def test_from_file_skips_unparsable_records_too(tmp_path):
    path = mixed_file(tmp_path)
    text = path.read_text()
    path.write_text(text[:-1] + ', {"image": "img.png"}]')
    with pytest.raises(InputError, match=r"1 bad record\(s\), first: .*mixed.json:4: a record needs"):
        RegionDataset.from_file(path, processor())
    dataset = RegionDataset.from_file(path, processor(), skip_bad=True)
    assert len(dataset) == 4 and [p.index for p in dataset.skipped] == [4]
    path.write_text("{broken")
    with pytest.raises(InputError, match="not valid JSON"):
        RegionDataset.from_file(path, processor(), skip_bad=True)


@pytest.mark.parametrize("framework", ["vision_object", "object_only"])
def test_collate_equals_encoding_the_batch_at_once(tmp_path, framework):
    proc = processor(framework)
    dataset = RegionDataset(load_annotations(mixed_file(tmp_path)), proc)
    batch = collate([dataset[i] for i in range(4)], proc.tokenizer.pad_token_id)
    loaded = [s.load_media() for s in dataset.samples]
    reference = proc.encode([x.text for x in loaded], images=[x.image for x in loaded],
                            videos=[x.video for x in loaded], masks=[x.masks for x in loaded])
    assert sorted(batch.inputs) == sorted(reference.inputs)
    for key, value in reference.inputs.items():
        assert torch.equal(batch.inputs[key], value), key
    assert batch.spans == reference.spans
    assert len(batch.crops) == len(reference.crops) == 4


def test_data_loader_batches_with_collate(tmp_path):
    proc = processor("object_only")
    dataset = RegionDataset(load_annotations(mixed_file(tmp_path)), proc)
    batches = list(data_loader(dataset, batch_size=3))
    assert [b.inputs["input_ids"].shape[0] for b in batches] == [3, 1]
    assert int(batches[0].inputs["region_global_index"].max()) + 1 == batches[0].inputs["region_global_pixel_values"]\
        .shape[0] // (proc.config.oci_global_size // 14) ** 2


def test_collate_rejects_unknown_keys_and_batched_items(tmp_path):
    proc = processor()
    dataset = RegionDataset(load_annotations(mixed_file(tmp_path)), proc)
    item = dataset[0]
    with pytest.raises(ValueError, match="single-sample"):
        collate([collate([item, item], proc.tokenizer.pad_token_id)], proc.tokenizer.pad_token_id)
    item.inputs["surprise"] = torch.zeros(1)
    with pytest.raises(KeyError, match="surprise"):
        collate([item], proc.tokenizer.pad_token_id)
