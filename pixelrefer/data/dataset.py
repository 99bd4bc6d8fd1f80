"""`RegionDataset`: samples → single-sample processor encodings, and `collate` to batch them.

Notable:
- `dataset[i]` loads sample i's media, decodes its masks and encodes it with
  the processor: an `EncodedBatch` of one sample, no padding.
- A bad record raises `InputError` naming its file and index. With
  `skip_bad=True` the samples are validated up front (the `pixelrefer data
  check` checks: headers and masks, no pixels) and the bad ones are left out
  and listed in `.skipped`; a sample is never swapped for another (the
  release silently substitutes a random one).
- `collate` concatenates single-sample encodings instead of re-encoding the
  batch, so every sample is encoded once, in the loader's workers. The rule
  is small: token rows are left-padded (as the processor pads), the
  Object-Centric-Infusion `region_global_index` is shifted by the global
  images before it, and every other tensor is packed along dim 0. Unknown
  keys raise instead of guessing. A test holds it equal to the processor's
  own batch path.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import BatchFeature

from pixelrefer.data.check import sample_problems
from pixelrefer.data.formats import Problem, read_annotations, strip_where
from pixelrefer.data.sample import Sample
from pixelrefer.errors import InputError
from pixelrefer.processing import IGNORE_INDEX, EncodedBatch, PixelReferProcessor, TokenSpan

_PACKED_KEYS = {
    "pixel_values", "image_grid_thw", "image_merge_sizes",
    "pixel_values_videos", "video_grid_thw", "video_merge_sizes", "video_compression_mask",
    "region_pixel_values", "region_grid_thw", "region_cell_mask", "region_cell_positions", "region_token_valid",
    "region_local_pixel_values", "region_global_pixel_values", "region_frame_index",
}
_OFFSET_KEYS = {"region_global_index"}  # indices into region_global_pixel_values' images


class RegionDataset(torch.utils.data.Dataset):
    """Map-style dataset of region samples for `PixelReferForConditionalGeneration`.

    Args:
        samples: parsed records (`load_annotations`).
        processor: encodes each sample.
        skip_bad: validate every sample now and leave out the bad ones
            (listed in `.skipped`) instead of raising when one is read.
    """

    def __init__(self, samples: list[Sample], processor: PixelReferProcessor, skip_bad: bool = False):
        self.processor = processor
        self.skipped: list[Problem] = []
        if skip_bad:
            kept = []
            for sample in samples:
                reasons = sample_problems(sample)
                self.skipped += [Problem(str(sample.source), sample.index, r) for r in reasons]
                if not reasons:
                    kept.append(sample)
            samples = kept
        self.samples = list(samples)

    @classmethod
    def from_file(cls, path: str | Path, processor: PixelReferProcessor, media_root: str | Path | None = None,
                  skip_bad: bool = False) -> "RegionDataset":
        """Dataset of one .json / .jsonl file; with `skip_bad`, unparsable records are skipped too.

        A file that cannot be read as a whole raises even with `skip_bad`.
        """
        parsed = read_annotations(path, media_root)
        whole_file = [p for p in parsed.problems if p.index is None]
        if whole_file or (parsed.problems and not skip_bad):
            first = (whole_file or parsed.problems)[0]
            raise InputError(f"{path}: {len(parsed.problems)} bad record(s), first: {first}")
        dataset = cls(parsed.samples, processor, skip_bad=skip_bad)
        dataset.skipped = sorted(parsed.problems + dataset.skipped, key=lambda p: -1 if p.index is None else p.index)
        return dataset

    @property
    def num_skipped(self) -> int:
        """Records left out (a record with several problems counts once)."""
        return len({(p.file, p.index) for p in self.skipped})

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> EncodedBatch:
        sample = self.samples[i]
        try:
            inputs = sample.load_media()
            return self.processor.encode(inputs.text, images=inputs.image, videos=inputs.video, masks=inputs.masks)
        except (InputError, OSError) as exc:
            raise InputError(f"{sample.where}: {strip_where(str(exc), sample.where)}") from exc

    def collate(self, items: list[EncodedBatch]) -> EncodedBatch:
        """`collate_fn` for a `DataLoader`: see the module-level `collate`."""
        return collate(items, pad_token_id=self.processor.tokenizer.pad_token_id)


def collate(items: list[EncodedBatch], pad_token_id: int) -> EncodedBatch:
    """Batch single-sample encodings exactly as `processor.encode(batch)` would have."""
    if not items:
        raise ValueError("collate needs at least one item")
    for b, item in enumerate(items):
        if item.inputs["input_ids"].shape[0] != 1:
            count = item.inputs["input_ids"].shape[0]
            raise ValueError(f"collate takes single-sample encodings; item {b} holds {count} samples")
    length = max(item.inputs["input_ids"].shape[1] for item in items)
    data = _token_rows(items, length, pad_token_id)
    keys = [k for item in items for k in item.inputs if k not in data and k != "labels"]
    for key in dict.fromkeys(keys):
        if key in _OFFSET_KEYS:
            data[key] = _offset_indices(items, key)
        elif key in _PACKED_KEYS:
            data[key] = torch.cat([item.inputs[key] for item in items if key in item.inputs])
        else:
            raise KeyError(f"collate does not know how to batch processor output {key!r}: add it to dataset.py")
    spans, crops = [], []
    for item in items:
        offset = length - item.inputs["input_ids"].shape[1]
        spans.append([TokenSpan(s.group, s.start + offset, s.end + offset, s.object_index, s.frame_index)
                      for s in item.spans[0]])
        crops.extend(item.crops)
    return EncodedBatch(BatchFeature(data=data), spans, crops)


def _token_rows(items: list[EncodedBatch], length: int, pad_token_id: int) -> dict[str, torch.Tensor]:
    """Left-pad input_ids / attention_mask / labels to `length` (labels only if any item has them)."""
    fills = {"input_ids": pad_token_id, "attention_mask": 0}
    if any("labels" in item.inputs for item in items):
        fills["labels"] = IGNORE_INDEX
    rows = {}
    for key, fill in fills.items():
        padded = torch.full((len(items), length), fill, dtype=torch.long)
        for b, item in enumerate(items):
            row = item.inputs.get(key)
            if row is None:  # an item without answers: nothing supervised
                continue
            padded[b, length - row.shape[1]:] = row[0]
        rows[key] = padded
    return rows


def _offset_indices(items: list[EncodedBatch], key: str) -> torch.Tensor:
    """Shift each item's global-image indices past the global images of the items before it."""
    shifted, seen = [], 0
    for item in items:
        if key in item.inputs:
            index = item.inputs[key]
            shifted.append(index + seen)
            seen += int(index.max()) + 1  # every global image of an item is referenced by one of its objects
    return torch.cat(shifted)


def data_loader(dataset: RegionDataset, batch_size: int, **kwargs) -> torch.utils.data.DataLoader:
    """A `DataLoader` over `dataset` that batches with `dataset.collate`."""
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=dataset.collate, **kwargs)
