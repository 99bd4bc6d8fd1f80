"""Region data: annotation formats, validation, the dataset, and the ShapesWorld generator.

    load_annotations(path)            .json / .jsonl records → `Sample`s
    check_annotations(path)           every bad record, with file, index and reason
    RegionDataset(samples, processor) samples → processor encodings; `collate` batches them
    generate_shapesworld(out_dir)     the seeded synthetic dataset; `shapesworld_vocabulary()`
"""

from pixelrefer.data.check import CheckReport, check_annotations
from pixelrefer.data.dataset import RegionDataset, collate
from pixelrefer.data.formats import Problem, load_annotations, read_annotations
from pixelrefer.data.sample import Sample, SampleInputs
from pixelrefer.data.shapesworld import generate_shapesworld, shapesworld_vocabulary

__all__ = [
    "CheckReport",
    "Problem",
    "RegionDataset",
    "Sample",
    "SampleInputs",
    "check_annotations",
    "collate",
    "generate_shapesworld",
    "load_annotations",
    "read_annotations",
    "shapesworld_vocabulary",
]
