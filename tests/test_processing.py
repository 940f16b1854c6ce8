"""The image processor saved with every model the launcher writes gives the training transform's pixel values."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image as PILImage
from transformers import AutoImageProcessor, ConvNextImageProcessorPil
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from hf_replacement.commands.data import image_transform, load_image_dataset, normalisation
from hf_replacement.commands.idx_files import FASHION_MNIST_DIR
from hf_replacement.commands.processing import (
    PROCESSOR_NAME,
    build_image_processor,
    load_saved_image_processor,
    square_size,
)

# What a pretrained Hub model's processor brings (e.g. ConvNeXt's on the Hub), as the launcher reads it.
IMAGENET = normalisation(ConvNextImageProcessorPil(image_mean=IMAGENET_DEFAULT_MEAN, image_std=IMAGENET_DEFAULT_STD))


def random_images(mode: str, sizes: list[tuple[int, int]]) -> list[PILImage.Image]:
    generator = np.random.default_rng(0)
    images = []
    for width, height in sizes:
        rgb = PILImage.fromarray(generator.integers(0, 256, (height, width, 3), dtype=np.uint8))
        images.append(rgb.convert(mode) if mode != "P" else rgb.quantize(64))
    return images


def digits_images() -> list[PILImage.Image]:
    return [example["image"] for example in load_image_dataset("digits")["test"].select(range(24))]


def fashion_mnist_images() -> list[PILImage.Image]:
    if not os.path.isdir(FASHION_MNIST_DIR):
        pytest.skip(f"Fashion-MNIST is not installed in {FASHION_MNIST_DIR}")
    return [example["image"] for example in load_image_dataset("fashion-mnist")["test"].select(range(24))]


# source -> (images, training image size, (mean, std)); every data source the launcher reads
SOURCES = {
    "digits 8x8 gray": (digits_images, 8, (0.5, 0.5)),
    "digits resized to 20": (digits_images, 20, (0.5, 0.5)),
    "fashion-mnist 28x28 gray": (fashion_mnist_images, 28, (0.5, 0.5)),
    "fashion-mnist resized to 16": (fashion_mnist_images, 16, (0.5, 0.5)),
    "imagefolder RGB of any size": (lambda: random_images("RGB", [(37, 23), (64, 64), (9, 50)]), 32, (0.5, 0.5)),
    "imagefolder palette images": (lambda: random_images("P", [(40, 30)]), 24, (0.5, 0.5)),
    "hub model's ImageNet statistics": (lambda: random_images("RGB", [(300, 200), (224, 224)]), 224, IMAGENET),
    "do_normalize=False": (lambda: random_images("RGB", [(20, 12)]), 16, (0.0, 1.0)),
}


@pytest.mark.parametrize("source", SOURCES)
def test_the_saved_processor_gives_the_training_pixel_values(source, tmp_path):
    load_images, image_size, (mean, std) = SOURCES[source]
    images = load_images()
    build_image_processor(image_size, 3, mean, std).save_pretrained(tmp_path)
    processor = AutoImageProcessor.from_pretrained(tmp_path)  # what pipeline(model=DIR) loads
    transform = image_transform(image_size, 3, mean, std)
    expected = torch.stack([transform(image) for image in images])
    served = processor(images, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(served, expected, rtol=0, atol=0)
    # The pipeline hands the processor RGB images (load_image converts): the same pixel values.
    torch.testing.assert_close(processor([image.convert("RGB") for image in images], return_tensors="pt")[
        "pixel_values"], expected, rtol=0, atol=0)  # fmt: skip
    if images[0].mode == "L":  # gray data sets are trained as RGB: three equal channels
        assert torch.equal(expected[:, 0], expected[:, 1]) and torch.equal(expected[:, 1], expected[:, 2])


def test_a_1_channel_processor_takes_gray_images_and_says_pipelines_cannot_serve_it(caplog):
    images = digits_images()
    with caplog.at_level(logging.WARNING, logger="hf_replacement.commands.processing"):
        processor = build_image_processor(12, 1, *IMAGENET)
    assert "cannot serve this model" in caplog.text
    expected = torch.stack([image_transform(12, 1, *IMAGENET)(image) for image in images])
    assert expected.shape[1] == 1
    torch.testing.assert_close(processor(images, return_tensors="pt")["pixel_values"], expected, rtol=0, atol=0)


def test_processor_json_is_legible_and_found_only_where_saved(tmp_path):
    processor = build_image_processor(16, 3, *IMAGENET)
    assert list(processor.image_mean) == [0.485, 0.456, 0.406] and list(processor.image_std) == [0.229, 0.224, 0.225]
    assert "0.4850000" not in processor.to_json_string()  # not the float32 value's long decimal
    assert load_saved_image_processor(tmp_path) is None
    processor.save_pretrained(tmp_path)
    assert (tmp_path / PROCESSOR_NAME).is_file() and square_size(load_saved_image_processor(tmp_path)) == 16
    assert square_size(ConvNextImageProcessorPil()) is None  # resizes the shortest edge: no square size
