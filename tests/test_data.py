"""Data sets (digits, Fashion-MNIST IDX, local dirs, column normalisation), transforms and the offline metric."""

from __future__ import annotations

import gzip
import os
import types

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value
from PIL import Image as PILImage

from hf_replacement.commands.data import (
    FASHION_MNIST_DIR,
    FASHION_MNIST_LABELS,
    DataError,
    collate_fn,
    dataset_info,
    image_transform,
    load_image_dataset,
    prepare_dataset,
    subsample,
)


@pytest.fixture(scope="module")
def digits() -> DatasetDict:
    return load_image_dataset("digits", seed=0)


# --- digits -----------------------------------------------------------------------------------


def test_digits_split_shape_and_labels(digits):
    assert set(digits) == {"train", "test"}
    assert (len(digits["train"]), len(digits["test"])) == (1437, 360)
    assert isinstance(digits["train"].features["image"], Image)
    assert digits["train"].features["label"].names == [str(i) for i in range(10)]
    image = digits["train"][0]["image"]
    assert isinstance(image, PILImage.Image) and image.mode == "L" and image.size == (8, 8)
    # Stratified: every class in both splits, in roughly the 80/20 proportion.
    for split, size in (("train", 1437), ("test", 360)):
        counts = np.bincount(digits[split]["label"], minlength=10)
        assert counts.min() > 0 and counts.sum() == size
    assert dataset_info(digits) == (10, {i: str(i) for i in range(10)})


def test_digits_pixels_match_sklearn(digits):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    source = load_digits()
    train_index, _ = train_test_split(np.arange(1797), test_size=0.2, stratify=source.target, random_state=0)
    first = digits["train"][0]
    expected = np.round(source.images[train_index[0]] * 255 / 16).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(first["image"]), expected)
    assert first["label"] == source.target[train_index[0]]
    assert int(np.asarray(first["image"]).max()) <= 255


def test_digits_deterministic_per_seed(digits):
    again = load_image_dataset("digits", seed=0)
    other = load_image_dataset("digits", seed=1)
    assert again["test"]["label"] == digits["test"]["label"]
    np.testing.assert_array_equal(np.asarray(again["test"][7]["image"]), np.asarray(digits["test"][7]["image"]))
    assert other["test"]["label"] != digits["test"]["label"]
    assert (len(other["train"]), len(other["test"])) == (1437, 360)


# --- transforms -------------------------------------------------------------------------------


def test_prepare_dataset_grayscale_default_normalisation(digits):
    prepared = prepare_dataset(digits, image_size=8, num_channels=1)
    example = prepared["test"][3]
    raw = np.asarray(digits["test"][3]["image"], dtype=np.float32)
    assert example["pixel_values"].dtype == torch.float32
    assert example["pixel_values"].shape == (1, 8, 8)
    # By hand: x / 255, then (x - 0.5) / 0.5.
    torch.testing.assert_close(example["pixel_values"][0], torch.from_numpy((raw / 255 - 0.5) / 0.5))
    assert example["label"] == digits["test"][3]["label"]
    # The caller's data set is untouched (lazy transform on a copy).
    assert set(digits["test"][3]) == {"image", "label"}


def test_prepare_dataset_resize_rgb_and_processor_stats(digits):
    processor = types.SimpleNamespace(
        image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225], do_normalize=True
    )
    prepared = prepare_dataset(digits, image_size=16, num_channels=3, image_processor=processor)
    values = prepared["train"][0]["pixel_values"]
    assert values.shape == (3, 16, 16)
    resized = (
        np.asarray(digits["train"][0]["image"].convert("RGB").resize((16, 16), PILImage.BILINEAR), dtype=np.float32)
        / 255
    )
    for channel in range(3):
        expected = (resized[..., channel] - processor.image_mean[channel]) / processor.image_std[channel]
        torch.testing.assert_close(values[channel], torch.from_numpy(expected))
    # do_normalize=False: plain [0, 1] values.
    plain = prepare_dataset(digits, 8, 1, types.SimpleNamespace(do_normalize=False, image_mean=[0.5], image_std=[0.5]))
    raw = np.asarray(digits["train"][0]["image"], dtype=np.float32) / 255
    torch.testing.assert_close(plain["train"][0]["pixel_values"][0], torch.from_numpy(raw))


def test_image_transform_rgb_to_gray_and_bad_channels():
    image = PILImage.new("RGB", (4, 2), (255, 0, 0))
    values = image_transform(4, 1, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])(image)
    gray = np.asarray(image.convert("L"), dtype=np.float32) / 255
    mean, std = np.mean([0.485, 0.456, 0.406]), np.mean([0.229, 0.224, 0.225])
    assert values.shape == (1, 4, 4)
    torch.testing.assert_close(values[0, 0, 0], torch.tensor((gray[0, 0] - mean) / std, dtype=torch.float32))
    with pytest.raises(DataError, match="1 .grayscale. or 3 .RGB."):
        image_transform(8, 2)


def test_collate_fn(digits):
    prepared = prepare_dataset(digits, 12, 3)
    batch = collate_fn([prepared["train"][i] for i in range(5)])
    assert batch["pixel_values"].shape == (5, 3, 12, 12)
    assert batch["labels"].dtype == torch.long
    assert batch["labels"].tolist() == digits["train"][:5]["label"]


def test_subsample(digits):
    small = subsample(digits, 50, 20, seed=3)
    assert (len(small["train"]), len(small["test"])) == (50, 20)
    assert small["train"]["label"] == subsample(digits, 50, 20, seed=3)["train"]["label"]
    assert small["train"]["label"] != subsample(digits, 50, 20, seed=4)["train"]["label"]
    whole = subsample(digits, None, 10_000, seed=0)
    assert (len(whole["train"]), len(whole["test"])) == (1437, 360)
    with pytest.raises(DataError, match="at least 1"):
        subsample(digits, 0, None)


# --- Fashion-MNIST IDX ------------------------------------------------------------------------


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    return header + array.astype(np.uint8).tobytes()


def _write_idx_set(directory, gz: bool = True, train: int = 6, test: int = 4, size: int = 5):
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {}
    for prefix, count in (("train", train), ("t10k", test)):
        images = rng.integers(0, 256, size=(count, size, size), dtype=np.uint8)
        labels = np.arange(count, dtype=np.uint8) % 10
        arrays[prefix] = (images, labels)
        for kind, array, dims in (("images", images, 3), ("labels", labels, 1)):
            name = os.path.join(directory, f"{prefix}-{kind}-idx{dims}-ubyte")
            data = _idx_bytes(array)
            if gz:
                with gzip.open(name + ".gz", "wb") as handle:
                    handle.write(data)
            else:
                with open(name, "wb") as handle:
                    handle.write(data)
    return arrays


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
def test_fashion_mnist_from_tiny_idx(tmp_path, gz):
    arrays = _write_idx_set(tmp_path, gz=gz)
    dataset = load_image_dataset("fashion-mnist", data_dir=str(tmp_path))
    assert (len(dataset["train"]), len(dataset["test"])) == (6, 4)
    assert dataset["train"].features["label"].names == FASHION_MNIST_LABELS
    image = dataset["test"][2]["image"]
    assert image.mode == "L" and image.size == (5, 5)
    np.testing.assert_array_equal(np.asarray(image), arrays["t10k"][0][2])
    assert dataset["train"]["label"] == arrays["train"][1].tolist()
    assert dataset_info(dataset)[1][9] == "Ankle boot"


@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_DIR), reason="dataset-fashion-mnist is not installed")
def test_fashion_mnist_installed():
    dataset = load_image_dataset("fashion-mnist")
    assert (len(dataset["train"]), len(dataset["test"])) == (60000, 10000)
    assert dataset["train"][0]["label"] == 9  # the first training image is an ankle boot
    assert dataset["train"][0]["image"].size == (28, 28)


def test_fashion_mnist_missing_dir(tmp_path):
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist") as error:
        load_image_dataset("fashion-mnist", data_dir=str(tmp_path / "nowhere"))
    assert "--data-dir" in str(error.value) and "does not exist" in str(error.value)


def test_fashion_mnist_missing_file(tmp_path):
    _write_idx_set(tmp_path)
    os.remove(tmp_path / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(DataError, match=r"lacks t10k-labels-idx1-ubyte\[\.gz\].*apt-get install"):
        load_image_dataset("fashion-mnist", data_dir=str(tmp_path))


def test_fashion_mnist_bad_magic(tmp_path):
    _write_idx_set(tmp_path)
    with gzip.open(tmp_path / "train-labels-idx1-ubyte.gz", "wb") as handle:
        handle.write(_idx_bytes(np.zeros((3, 2, 2), dtype=np.uint8)))  # a 3-d file where labels belong
    with pytest.raises(
        DataError, match=r"train-labels-idx1-ubyte.gz is not an IDX file of 1-d unsigned bytes: magic 00000803"
    ):
        load_image_dataset("fashion-mnist", data_dir=str(tmp_path))


def test_fashion_mnist_truncated_payload(tmp_path):
    _write_idx_set(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    with gzip.open(path, "wb") as handle:
        handle.write(data[:-7])
    with pytest.raises(DataError, match="truncated or corrupt"):
        load_image_dataset("fashion-mnist", data_dir=str(tmp_path))


def test_fashion_mnist_truncated_gzip(tmp_path):
    _write_idx_set(tmp_path)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:30])
    with pytest.raises(DataError, match="not a readable"):
        load_image_dataset("fashion-mnist", data_dir=str(tmp_path))


def test_fashion_mnist_count_mismatch(tmp_path):
    _write_idx_set(tmp_path)
    with gzip.open(tmp_path / "t10k-labels-idx1-ubyte.gz", "wb") as handle:
        handle.write(_idx_bytes(np.zeros(3, dtype=np.uint8)))
    with pytest.raises(DataError, match="has 4 images but .* has 3 labels"):
        load_image_dataset("fashion-mnist", data_dir=str(tmp_path))


# --- local directories and column normalisation ------------------------------------------------


def _write_images(directory, count: int, color) -> None:
    os.makedirs(directory, exist_ok=True)
    for index in range(count):
        PILImage.new("RGB", (6, 4), color).save(os.path.join(directory, f"{index}.png"))


def test_imagefolder_without_test_split(tmp_path):
    _write_images(tmp_path / "cat", 10, (200, 0, 0))
    _write_images(tmp_path / "dog", 10, (0, 0, 200))
    dataset = load_image_dataset(str(tmp_path), seed=0)
    assert dataset_info(dataset) == (2, {0: "cat", 1: "dog"})
    assert (len(dataset["train"]), len(dataset["test"])) == (18, 2)
    assert sorted(dataset["test"]["label"]) == [0, 1]  # stratified hold-out
    example = dataset["test"][0]
    assert example["image"].mode == "RGB" and example["image"].size == (6, 4)
    assert load_image_dataset(str(tmp_path), seed=0)["test"]["label"] == dataset["test"]["label"]
    # Also reachable as name "imagefolder" with --data-dir.
    assert len(load_image_dataset("imagefolder", data_dir=str(tmp_path))["train"]) == 18


def test_imagefolder_with_a_corrupt_image_fails_at_load(tmp_path):
    _write_images(tmp_path / "cat", 10, (200, 0, 0))
    _write_images(tmp_path / "dog", 10, (0, 0, 200))
    (tmp_path / "dog" / "broken.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(DataError, match=r"dog/broken.png is not a readable image .*; remove or replace it"):
        load_image_dataset(str(tmp_path), seed=0)


def test_imagefolder_with_splits(tmp_path):
    for split, count in (("train", 3), ("test", 2)):
        _write_images(tmp_path / split / "a", count, (10, 10, 10))
        _write_images(tmp_path / split / "b", count, (250, 250, 250))
    dataset = load_image_dataset(str(tmp_path))
    assert (len(dataset["train"]), len(dataset["test"])) == (6, 4)
    assert dataset["test"].features["label"].names == ["a", "b"]


def test_save_to_disk_renames_columns_and_uses_validation(tmp_path):
    features = Features({"img": Image(), "labels": ClassLabel(names=["x", "y", "z"]), "extra": Value("string")})
    images = [PILImage.new("RGB", (3, 3), (i * 20, 0, 0)) for i in range(6)]
    part = Dataset.from_dict({"img": images, "labels": [0, 1, 2, 0, 1, 2], "extra": list("abcdef")}, features=features)
    DatasetDict(train=part, validation=part.select(range(3))).save_to_disk(str(tmp_path / "saved"))
    dataset = load_image_dataset(str(tmp_path / "saved"))
    assert set(dataset) == {"train", "test"}
    assert dataset["train"].column_names == ["image", "label"]
    assert (len(dataset["train"]), len(dataset["test"])) == (6, 3)
    assert dataset_info(dataset) == (3, {0: "x", 1: "y", 2: "z"})
    assert np.asarray(dataset["test"][2]["image"])[0, 0, 0] == 40


def test_save_to_disk_dataset_with_integer_labels(tmp_path):
    images = [PILImage.new("L", (4, 4), i) for i in range(20)]
    features = Features({"image": Image(), "fine_label": Value("int64")})
    Dataset.from_dict({"image": images, "fine_label": [5, 7] * 10}, features=features).save_to_disk(
        str(tmp_path / "one")
    )
    dataset = load_image_dataset(str(tmp_path / "one"), seed=0)
    # int labels become a ClassLabel; no test split -> 10% held out.
    assert dataset_info(dataset) == (2, {0: "5", 1: "7"})
    assert (len(dataset["train"]), len(dataset["test"])) == (18, 2)


def test_dataset_without_labels(tmp_path):
    features = Features({"image": Image(), "caption": Value("string")})
    Dataset.from_dict(
        {"image": [PILImage.new("L", (2, 2))] * 2, "caption": ["a", "b"]}, features=features
    ).save_to_disk(str(tmp_path / "nolabel"))
    with pytest.raises(DataError, match=r"has columns \['image', 'caption'\]; expected .*label column"):
        load_image_dataset(str(tmp_path / "nolabel"))


def test_unknown_name_offline(monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="neither a known name .*save_to_disk"):
        load_image_dataset("hf-replacement-tests/no-such-dataset")


def test_dataset_info_requires_classlabel():
    dataset = Dataset.from_dict({"label": [1, 2]})
    with pytest.raises(DataError, match="ClassLabel"):
        dataset_info(dataset)
