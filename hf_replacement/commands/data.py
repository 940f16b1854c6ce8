"""Image-classification data sets as `DatasetDict`s with "train"/"test" splits and `image`/`label` columns.

Sources: scikit-learn's digits (ships in the wheel), Fashion-MNIST from local IDX files (Debian's
`dataset-fashion-mnist` or `--data-dir`), a local `save_to_disk` or imagefolder directory, or a
Hub id. Every source comes out the same shape: `image` is a `datasets.Image` (PIL on access) and
`label` a `datasets.ClassLabel` with names.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from datasets import ClassLabel, Dataset, DatasetDict, DatasetInfo, Features, Image, load_dataset, load_from_disk
from PIL import Image as PILImage

from .errors import DataError
from .idx_files import FASHION_MNIST_DIR, FASHION_MNIST_FILES, FASHION_MNIST_LABELS, read_idx

logger = logging.getLogger(__name__)

_IMAGE_ALIASES = ("image", "img")
_LABEL_ALIASES = ("label", "labels", "fine_label")


def load_image_dataset(name: str, data_dir: str | None = None, seed: int = 0) -> DatasetDict:
    """Load `name` ("digits", "fashion-mnist", a local directory or a Hub id) as train/test splits.

    `data_dir` is where the Fashion-MNIST IDX files are (default /usr/share/datasets/fashion-mnist),
    the folder for `name="imagefolder"`, or passed on to `datasets.load_dataset` for a Hub id.
    `seed` fixes the digits split and any split made because the source has no test split.
    """
    key = name.strip().lower()
    if key == "digits":
        dataset = _load_digits(seed)
    elif key in ("fashion-mnist", "fashion_mnist"):
        dataset = _load_fashion_mnist(data_dir or FASHION_MNIST_DIR)
    elif os.path.isdir(name):
        dataset = _load_local_dir(name)
    elif key == "imagefolder":
        if not data_dir or not os.path.isdir(data_dir):
            raise DataError(
                f"imagefolder needs --data-dir DIR with one sub-folder of images per class (got {data_dir!r})."
            )
        dataset = _load_local_dir(data_dir)
    else:
        dataset = _load_hub(name, data_dir)
    dataset = _normalise(dataset, name, seed)
    logger.info("Loaded %s: %s", name, {split: len(part) for split, part in dataset.items()})
    return dataset


def _gray_dataset(images: np.ndarray, labels: np.ndarray, names: Sequence[str]) -> Dataset:
    """Dataset from uint8 grayscale images (N, H, W), stored as binary PGM so no PNG encoding is needed.

    Encoding 70k PNGs through PIL takes many seconds; a PGM is a 15-byte header before the raw
    pixels, which PIL decodes on access to a mode "L" image like any other file.
    """
    count, height, width = images.shape
    header = f"P5\n{width} {height}\n255\n".encode()
    flat = np.ascontiguousarray(images, dtype=np.uint8).reshape(count, -1)
    encoded = pa.array([header + row.tobytes() for row in flat], type=pa.binary())
    image_column = pa.StructArray.from_arrays([encoded, pa.nulls(count, pa.string())], names=["bytes", "path"])
    table = pa.table({"image": image_column, "label": pa.array(np.asarray(labels, dtype=np.int64))})
    features = Features({"image": Image(), "label": ClassLabel(names=list(names))})
    return Dataset(table, info=DatasetInfo(features=features))


def _load_digits(seed: int) -> DatasetDict:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    # Pixel values are counts 0..16 of a 4x4 block: stretch to the full 8-bit range.
    images = np.round(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    train_index, test_index = train_test_split(
        np.arange(len(images)), test_size=0.2, stratify=digits.target, random_state=seed
    )
    names = [str(i) for i in range(10)]
    return DatasetDict(
        train=_gray_dataset(images[train_index], digits.target[train_index], names),
        test=_gray_dataset(images[test_index], digits.target[test_index], names),
    )


def _find_idx_file(directory: str, base: str) -> str | None:
    for candidate in (base + ".gz", base):
        path = os.path.join(directory, candidate)
        if os.path.isfile(path):
            return path
    return None


def _load_fashion_mnist(directory: str) -> DatasetDict:
    paths = {
        split: tuple(_find_idx_file(directory, base) for base in bases) for split, bases in FASHION_MNIST_FILES.items()
    }
    missing = [
        base + "[.gz]"
        for split, bases in FASHION_MNIST_FILES.items()
        for base, path in zip(bases, paths[split])
        if path is None
    ]
    if missing:
        files = ", ".join(base + ".gz" for bases in FASHION_MNIST_FILES.values() for base in bases)
        where = "does not exist" if not os.path.isdir(directory) else f"lacks {', '.join(missing)}"
        raise DataError(
            f"Fashion-MNIST not found: {directory} {where}. "
            "Install it with `sudo apt-get install dataset-fashion-mnist` "
            f"(files go to {FASHION_MNIST_DIR}), or pass --data-dir DIR holding the four IDX files ({files})."
        )
    splits = {}
    for split, (image_path, label_path) in paths.items():
        images, labels = read_idx(image_path, 3), read_idx(label_path, 1)
        if len(images) != len(labels):
            raise DataError(f"{image_path} has {len(images)} images but {label_path} has {len(labels)} labels.")
        if labels.size and int(labels.max()) >= len(FASHION_MNIST_LABELS):
            raise DataError(f"{label_path} has label {int(labels.max())}; Fashion-MNIST labels are 0..9.")
        splits[split] = _gray_dataset(images, labels, FASHION_MNIST_LABELS)
    return DatasetDict(splits)


def _load_local_dir(path: str) -> DatasetDict | Dataset:
    # save_to_disk writes dataset_dict.json (DatasetDict) or state.json (Dataset); anything else
    # is read as an imagefolder (one sub-folder per class, optionally under train/ and test/).
    if os.path.isfile(os.path.join(path, "dataset_dict.json")) or os.path.isfile(os.path.join(path, "state.json")):
        try:
            return load_from_disk(path)
        except (OSError, ValueError) as error:
            raise DataError(f"Could not read the saved data set in {path}: {error}") from error
    try:
        dataset = load_dataset("imagefolder", data_dir=path)
    except (OSError, ValueError) as error:
        raise DataError(
            f"Could not read {path} as an image folder ({error}). A local directory must be a `save_to_disk` "
            "directory or hold one sub-folder of images per class (optionally under train/ and test/)."
        ) from error
    _check_images(path)
    return dataset


def _check_images(path: str) -> None:
    """Read every image's header now: a corrupt file would otherwise stop training when first drawn."""
    extensions = tuple(PILImage.registered_extensions())
    for root, _, names in os.walk(path):
        for name in sorted(names):
            if not name.lower().endswith(extensions):
                continue
            file = os.path.join(root, name)
            try:
                with PILImage.open(file) as image:
                    image.verify()
            except (OSError, SyntaxError) as error:  # PIL reports a damaged file as either
                raise DataError(f"{file} is not a readable image ({error}); remove or replace it.") from None


def _load_hub(name: str, data_dir: str | None) -> DatasetDict | Dataset:
    try:
        return load_dataset(name, data_dir=data_dir)
    except (OSError, ValueError) as error:  # ConnectionError and DatasetNotFoundError are OSErrors
        raise DataError(
            f"Could not load data set {name!r}: it is neither a known name (digits, fashion-mnist), an existing "
            f"directory, nor loadable from the Hugging Face Hub ({type(error).__name__}: {error}). Use one of the "
            "known names, pass a local `save_to_disk`/imagefolder directory, or check the Hub id and your network "
            "(offline, the data set must already be in the datasets cache)."
        ) from error


def _rename_column(dataset: DatasetDict, aliases: Sequence[str], target: str, feature_type: type) -> DatasetDict:
    columns = dataset["train"].column_names
    if target in columns:
        return dataset
    for alias in aliases:
        if alias in columns:
            return dataset.rename_column(alias, target)
    # Fall back to the only column of the right feature type (e.g. a data set's "picture" column).
    typed = [column for column, feature in dataset["train"].features.items() if isinstance(feature, feature_type)]
    if len(typed) == 1:
        return dataset.rename_column(typed[0], target)
    return dataset


def _normalise(dataset: DatasetDict | Dataset, name: str, seed: int) -> DatasetDict:
    """Bring any source to splits train/test and columns image (Image) / label (ClassLabel)."""
    if isinstance(dataset, Dataset):
        dataset = DatasetDict(train=dataset)
    if "train" not in dataset:
        raise DataError(f"Data set {name!r} has no 'train' split (splits: {sorted(dataset)}).")
    dataset = _rename_column(dataset, _IMAGE_ALIASES, "image", Image)
    dataset = _rename_column(dataset, _LABEL_ALIASES, "label", ClassLabel)
    columns = dataset["train"].column_names
    if "image" not in columns or "label" not in columns:
        raise DataError(
            f"Data set {name!r} has columns {columns}; expected an image column (image or img, a datasets.Image) "
            f"and a label column (label, labels or fine_label) for image classification."
        )
    if not isinstance(dataset["train"].features["image"], Image):
        raise DataError(
            f"Data set {name!r}: column 'image' is {dataset['train'].features['image']}, expected datasets.Image."
        )
    if "test" not in dataset:
        if "validation" in dataset:
            dataset = DatasetDict(train=dataset["train"], test=dataset["validation"])
        else:
            dataset = DatasetDict(train=dataset["train"])  # set below
    dataset = DatasetDict(
        {
            split: part.select_columns(["image", "label"])
            for split, part in dataset.items()
            if split in ("train", "test")
        }
    )
    if not isinstance(dataset["train"].features["label"], ClassLabel):
        # Integer or string labels: encode over all splits together so ids agree between splits.
        dataset = dataset.class_encode_column("label")
    if "test" not in dataset:
        logger.info("%s has no test or validation split: holding out 10%% of train (seed %d).", name, seed)
        try:
            parts = dataset["train"].train_test_split(test_size=0.1, seed=seed, stratify_by_column="label")
        except ValueError:  # too few examples of some class to stratify
            parts = dataset["train"].train_test_split(test_size=0.1, seed=seed)
        dataset = DatasetDict(train=parts["train"], test=parts["test"])
    return dataset


def dataset_info(dataset: DatasetDict | Dataset) -> tuple[int, dict[int, str]]:
    """(number of labels, id2label) from the `label` ClassLabel feature."""
    part = dataset["train"] if isinstance(dataset, DatasetDict) else dataset
    feature = part.features.get("label")
    if not isinstance(feature, ClassLabel):
        raise DataError(f"Column 'label' must be a datasets.ClassLabel, found {feature!r}.")
    return feature.num_classes, {index: label for index, label in enumerate(feature.names)}


def subsample(dataset: DatasetDict, max_train: int | None, max_test: int | None, seed: int = 0) -> DatasetDict:
    """At most `max_train`/`max_test` examples per split (shuffled with `seed`); None keeps a split whole."""
    limits = {"train": max_train, "test": max_test}
    result = {}
    for split, part in dataset.items():
        limit = limits.get(split)
        if limit is not None and limit < 1:
            raise DataError(f"max samples for {split} must be at least 1, got {limit}.")
        result[split] = (
            part.shuffle(seed=seed).select(range(limit)) if limit is not None and limit < len(part) else part
        )
    return DatasetDict(result)


def per_channel(values: float | Sequence[float], num_channels: int, what: str) -> np.ndarray:
    """`values` (an image mean or std, named by `what` in errors) as one float32 per channel."""
    array = np.atleast_1d(np.asarray(values, dtype=np.float32))
    if len(array) == num_channels:
        return array
    if len(array) == 1:
        return np.repeat(array, num_channels)
    if num_channels == 1:
        # An RGB processor's statistics applied to grayscale input: the gray value is their average.
        return np.asarray([array.mean()], dtype=np.float32)
    raise DataError(f"image {what} has {len(array)} values but the model takes {num_channels} channels.")


def image_transform(
    image_size: int, num_channels: int, mean: float | Sequence[float] = 0.5, std: float | Sequence[float] = 0.5
) -> Callable[[PILImage.Image], torch.Tensor]:
    """PIL image -> float tensor (C, H, W): convert to L/RGB, bilinear resize, scale to [0, 1], normalise."""
    if num_channels not in (1, 3):
        raise DataError(f"num_channels must be 1 (grayscale) or 3 (RGB), got {num_channels}.")
    mode = "L" if num_channels == 1 else "RGB"
    mean_array = per_channel(mean, num_channels, "mean").reshape(-1, 1, 1)
    std_array = per_channel(std, num_channels, "std").reshape(-1, 1, 1)
    if np.any(std_array == 0):
        raise DataError(f"image std must be non-zero, got {std_array.ravel().tolist()}.")

    def transform(image: PILImage.Image) -> torch.Tensor:
        image = image.convert(mode)
        if image.size != (image_size, image_size):
            image = image.resize((image_size, image_size), PILImage.BILINEAR)
        array = np.asarray(image, dtype=np.float32) / 255.0
        array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
        return torch.from_numpy((array - mean_array) / std_array)

    return transform


def normalisation(image_processor: Any = None) -> tuple[float | Sequence[float], float | Sequence[float]]:
    """(mean, std) the transform normalises with: the image processor's image_mean/image_std when one is
    given (mean 0, std 1 when its do_normalize is False), else mean 0.5 / std 0.5."""
    if image_processor is None:
        return 0.5, 0.5
    if getattr(image_processor, "do_normalize", True) is False:
        return 0.0, 1.0
    return getattr(image_processor, "image_mean", None) or 0.5, getattr(image_processor, "image_std", None) or 0.5


def prepare_dataset(
    dataset: DatasetDict, image_size: int, num_channels: int, image_processor: Any = None
) -> DatasetDict:
    """Lazily map `image` to normalised `pixel_values` (C, H, W) for every split; `label` is kept.

    Normalises as `normalisation(image_processor)` says. The input DatasetDict is left unchanged.
    """
    transform = image_transform(image_size, num_channels, *normalisation(image_processor))

    def apply(batch: dict[str, list]) -> dict[str, list]:
        missing = [column for column in ("image", "label") if column not in batch]
        if missing:
            raise DataError(
                f"prepare_dataset's transform needs the columns 'image' and 'label' and got only {sorted(batch)}: "
                "a plain transformers.Trainer removes the columns its model's forward does not name. Pass "
                "TrainingArguments(remove_unused_columns=False), or train with "
                "hf_replacement.ReplacementTrainer, which keeps them."
            )
        return {"pixel_values": [transform(image) for image in batch["image"]], "label": batch["label"]}

    # with_transform is set_transform on a copy: lazy, and the caller's raw data keeps its images.
    return DatasetDict({split: part.with_transform(apply) for split, part in dataset.items()})


def collate_fn(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Batch prepared examples into {"pixel_values": (B, C, H, W), "labels": LongTensor (B,)}."""
    key = "label" if "label" in examples[0] else "labels"
    return {
        "pixel_values": torch.stack([example["pixel_values"] for example in examples]),
        "labels": torch.tensor([int(example[key]) for example in examples], dtype=torch.long),
    }


__all__ = [
    "DataError",
    "collate_fn",
    "dataset_info",
    "image_transform",
    "load_image_dataset",
    "normalisation",
    "per_channel",
    "prepare_dataset",
    "subsample",
]
