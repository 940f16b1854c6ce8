"""The image processor saved next to every model the launcher writes: `data.image_transform` as a Transformers
image processor, so `AutoImageProcessor` and `pipeline("image-classification", model=DIR)` give the model the
pixel values it was trained and evaluated on.

It is a `ViTImageProcessor` whatever the architecture: its steps (convert to RGB, resize to a square with PIL's
bilinear filter, scale by 1/255, normalise) are the training transform's, one for one, while DeiT's and ConvNeXt's
own processors crop or resize the shortest edge, which training does not. `preprocessor_config.json` names the
class, so `AutoImageProcessor` loads it for any model type.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

from transformers import AutoImageProcessor, ViTImageProcessorPil
from transformers.image_utils import PILImageResampling
from transformers.utils import IMAGE_PROCESSOR_NAME

from .data import per_channel

logger = logging.getLogger(__name__)

PROCESSOR_NAME = IMAGE_PROCESSOR_NAME  # preprocessor_config.json


def build_image_processor(
    image_size: int, num_channels: int, mean: float | Sequence[float] = 0.5, std: float | Sequence[float] = 0.5
) -> ViTImageProcessorPil:
    """The image processor whose output equals `data.image_transform(image_size, num_channels, mean, std)`.

    The PIL backend: it resizes with PIL, as the transform does (the torchvision backend, which
    `AutoImageProcessor` picks when torchvision is installed, resizes with torch, a little differently).
    For `num_channels=1` it takes grayscale images only; pipelines hand a model RGB images, so a
    1-channel model cannot be served by one (the launcher trains gray data sets as RGB for this reason).
    """
    if num_channels == 1:
        logger.warning(
            "A 1-channel model: its image processor takes grayscale images, but pipeline('image-classification') "
            "converts every image to RGB first, so it cannot serve this model. Call the processor and the model "
            "directly, or train on RGB (the launcher's presets replicate gray images to 3 channels)."
        )
    return ViTImageProcessorPil(
        do_convert_rgb=num_channels == 3,
        do_resize=True,
        size={"height": image_size, "width": image_size},
        resample=PILImageResampling.BILINEAR,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=_json_floats(per_channel(mean, num_channels, "mean")),
        image_std=_json_floats(per_channel(std, num_channels, "std")),
    )


def _json_floats(values: Sequence[float]) -> list[float]:
    # The transform computes in float32: the shortest decimal of each float32 value (0.485, not
    # 0.48500001430511475) reads back as that same float32, and keeps preprocessor_config.json legible.
    return [float(str(value)) for value in values]


def load_saved_image_processor(directory: str | os.PathLike) -> Any | None:
    """The image processor saved in the local model directory `directory`, or None when it has none."""
    if not os.path.isfile(os.path.join(os.fspath(directory), PROCESSOR_NAME)):
        return None
    return AutoImageProcessor.from_pretrained(os.fspath(directory))


def square_size(image_processor: Any) -> int | None:
    """The side of the square images `image_processor` resizes to, or None when it resizes otherwise."""
    size = getattr(image_processor, "size", None)
    if size is None or not getattr(image_processor, "do_resize", False):
        return None
    height, width = (size.get("height"), size.get("width")) if isinstance(size, dict) else (size.height, size.width)
    return int(height) if height and height == width else None


__all__ = ["PROCESSOR_NAME", "build_image_processor", "load_saved_image_processor", "square_size"]
