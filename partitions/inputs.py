"""What the model is fed: the dataset's own images, or under the reference protocol
3-channel 32 x 32 inputs (method.md section 7). Applied once, where a site's data (or the
server's evaluation data) is loaded."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from core.protocol import REFERENCE_CHANNELS, REFERENCE_IMAGE_SIZE
from partitions.medmnist_data import DatasetSpec, MedMNISTData, Split, dataset_spec


def input_spec(flag: str, size: int = 28, reference: bool = False) -> DatasetSpec:
    """What the model sees: the dataset's own channels and size, or under the reference
    protocol 3 channels at 32 x 32 (method.md section 7)."""
    spec = dataset_spec(flag, size)
    if not reference:
        return spec

    return replace(spec, channels=REFERENCE_CHANNELS, image_size=REFERENCE_IMAGE_SIZE)


def reference_inputs(split: Split, chunk: int = 4096) -> Split:
    """The reference code's inputs: bilinear resize of the uint8 images to 32 x 32, and
    grayscale repeated to 3 channels; still uint8 (scaled to [0, 1] per batch as always)."""
    import torch
    from torch.nn.functional import interpolate

    images = split.images
    size = REFERENCE_IMAGE_SIZE
    out = np.empty((len(images), REFERENCE_CHANNELS, size, size), dtype=np.uint8)
    for start in range(0, len(images), chunk):
        x = torch.from_numpy(np.ascontiguousarray(images[start : start + chunk])).float()
        if x.shape[-1] != size or x.shape[-2] != size:
            x = interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        if x.shape[1] == 1:
            x = x.expand(-1, REFERENCE_CHANNELS, -1, -1)
        out[start : start + chunk] = x.round().clamp(0, 255).to(torch.uint8).numpy()
    return Split(images=out, labels=split.labels)


def as_protocol(data: MedMNISTData, to_reference_inputs: bool) -> MedMNISTData:
    """`data` itself, or with the reference protocol's 32-px 3-channel inputs."""
    if not to_reference_inputs:
        return data
    splits = {name: reference_inputs(split) for name, split in data.splits.items()}
    return MedMNISTData(spec=input_spec(data.spec.name, data.spec.image_size, True), splits=splits)
