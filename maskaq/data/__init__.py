"""Datasets: Fashion-MNIST (test split bundled, train split from disk) and image folders read
the way timm evaluates (torchvision's ImageFolder with timm's data config and eval transform).

Fashion-MNIST is decoded once into a uint8 tensor and normalized in one vectorized step, so a
full pass over the 60k training images costs almost nothing next to the model.
"""
from __future__ import annotations

import functools
import gzip
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from maskaq._files import atomic_write

__all__ = ["FMNIST_MEAN", "FMNIST_STD", "FMNIST_CLASSES", "DEBIAN_FMNIST_ROOT", "BUNDLED_TEST_NPZ",
           "FashionMNIST", "fashion_mnist", "read_idx", "ImageFolder", "image_folder", "data_config",
           "DATA_CONFIG_KEYS", "image_problem"]

# Mean/std of the Fashion-MNIST training pixels in [0, 1] (computed on the 60k train images).
FMNIST_MEAN: Tuple[float] = (0.2860,)
FMNIST_STD: Tuple[float] = (0.3530,)
FMNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                  "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
DEBIAN_FMNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
BUNDLED_TEST_NPZ = Path(__file__).with_name("fashion_mnist_test.npz")

_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_HOW_TO_GET = ("install it with `apt-get install dataset-fashion-mnist` (files land in "
               f"{DEBIAN_FMNIST_ROOT}) or pass root= a directory holding the idx(.gz) files")


def read_idx(path) -> np.ndarray:
    """Decode one idx file (optionally gzip-compressed) into a numpy array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte idx file (bad magic number)")
    ndim = data[3]
    dims = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims))
    if len(data) - offset != expected:
        raise ValueError(f"{path}: header says {dims} ({expected} bytes) but holds {len(data) - offset}")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


def _find_idx(root: Path, stem: str) -> Optional[Path]:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    return None


def _load_split_from_dir(root: Path, split: str):
    image_stem, label_stem = _FILES[split]
    images_path, labels_path = _find_idx(root, image_stem), _find_idx(root, label_stem)
    if images_path is None or labels_path is None:
        raise FileNotFoundError(f"Fashion-MNIST {split} split not found in {root} "
                                f"(need {image_stem}[.gz] and {label_stem}[.gz]); {_HOW_TO_GET}")
    return read_idx(images_path), read_idx(labels_path)


class FashionMNIST(Dataset):
    """In-memory Fashion-MNIST: items are (normalized float tensor (1, 28, 28), int label).

    `images_uint8` (N, 28, 28) and `labels` (N,) int64 keep the raw data for fast batched use.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, mean=FMNIST_MEAN, std=FMNIST_STD,
                 split: str = ""):
        if images.ndim != 3 or images.shape[0] != labels.shape[0]:
            raise ValueError(f"expected images (N, H, W) and labels (N,), got {images.shape}, {labels.shape}")
        self.split = split
        self.mean, self.std = tuple(mean), tuple(std)
        self.images_uint8 = torch.from_numpy(np.array(images, dtype=np.uint8))  # own, writable copy
        self.labels = torch.from_numpy(np.array(labels, dtype=np.int64))
        # Normalize once: 60k x 784 floats is 188 MB, 10k is 31 MB; indexing is then free.
        self.images = self.normalize(self.images_uint8)

    def normalize(self, images_uint8: torch.Tensor) -> torch.Tensor:
        x = images_uint8.to(torch.float32).div_(255.0).unsqueeze(1)
        return x.sub_(self.mean[0]).div_(self.std[0])

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, index):
        return self.images[index], int(self.labels[index])

    def __repr__(self) -> str:
        return f"FashionMNIST(split={self.split!r}, n={len(self)})"


def fashion_mnist(split: str = "test", root=None) -> FashionMNIST:
    """Fashion-MNIST as a torch Dataset of (normalized (1, 28, 28) float, int label).

    split 'test' reads the copy bundled with the package (or `root` when given); split 'train'
    reads `root` or the Debian package path /usr/share/datasets/fashion-mnist.
    Normalization uses FMNIST_MEAN / FMNIST_STD.
    """
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if root is not None:
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"Fashion-MNIST root {root} is not a directory; {_HOW_TO_GET}")
        images, labels = _load_split_from_dir(root, split)
    elif split == "test" and BUNDLED_TEST_NPZ.is_file():
        with np.load(BUNDLED_TEST_NPZ) as npz:
            images, labels = npz["images"], npz["labels"]
    else:
        images, labels = _load_split_from_dir(DEBIAN_FMNIST_ROOT, split)
    return FashionMNIST(images, labels, split=split)


def write_bundled_test_split(root=DEBIAN_FMNIST_ROOT, out=BUNDLED_TEST_NPZ) -> Path:
    """(Re)create the bundled test split npz from the idx files (maintainer tool)."""
    images, labels = _load_split_from_dir(Path(root), "test")
    out = Path(out)

    def write(tmp):
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a path
            np.savez_compressed(f, images=images, labels=labels)

    return atomic_write(out, write)


# Keys of timm's data config that image_folder accepts as overrides of the model's pretrained_cfg.
DATA_CONFIG_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")


def data_config(model=None, **overrides) -> dict:
    """timm's evaluation data config for ``model`` (``timm.data.resolve_data_config``: its
    pretrained_cfg, else timm's defaults), with keyword overrides (``DATA_CONFIG_KEYS``)."""
    from timm.data import resolve_data_config

    unknown = sorted(set(overrides) - set(DATA_CONFIG_KEYS))
    if unknown:
        raise TypeError(f"unknown data config key(s) {unknown}; valid: {', '.join(DATA_CONFIG_KEYS)}")
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        # without a model: timm's defaults (its resolver wants some config to start from)
        config = resolve_data_config(dict(given), model=model,
                                     pretrained_cfg=None if model is not None else {"input_size": (3, 224, 224)})
    except AssertionError:  # timm asserts that mean/std fit the channels
        channels = tuple(given.get("input_size") or (3,))[0]
        raise ValueError(f"mean/std need {channels} values for input_size {given.get('input_size')}, "
                         f"got {given.get('mean')}, {given.get('std')}") from None
    if len(config["input_size"]) != 3 or config["input_size"][0] not in (1, 3):
        raise ValueError(f"input_size must be (C, H, W) with 1 or 3 channels, got {tuple(config['input_size'])}")
    channels = config["input_size"][0]
    if len(config["mean"]) != channels or len(config["std"]) != channels:
        raise ValueError(f"mean/std need {channels} values for input_size {tuple(config['input_size'])}, "
                         f"got {tuple(config['mean'])}, {tuple(config['std'])}")
    return config


def image_folder(path, model=None, **overrides):
    """``torchvision.datasets.ImageFolder`` over ``path`` (one sub-directory per class) with timm's
    evaluation transform for ``model`` (``timm.data.create_transform(**resolve_data_config(model=model))``):
    the tensors timm's own validate.py feeds the same model. Keyword overrides (``input_size``,
    ``interpolation``, ``mean``, ``std``, ``crop_pct``, ``crop_mode``) replace the model's
    pretrained_cfg values. Images are read as RGB, or as grayscale for a 1-channel model (as timm's
    ``input_img_mode``)."""
    from timm.data import create_transform
    from torchvision.datasets import ImageFolder

    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"ImageFolder path {root} is not a directory "
                                "(expected one sub-directory of images per class)")
    config = data_config(model, **overrides)
    mode = "L" if config["input_size"][0] == 1 else "RGB"
    try:
        return ImageFolder(str(root), transform=create_transform(**config),
                           loader=functools.partial(_load_image, mode=mode))
    except FileNotFoundError as exc:  # torchvision: no class folder, or no image in them
        raise FileNotFoundError(f"{root}: {exc} (expected one sub-directory of images per class)") from None


def image_problem(path) -> Optional[str]:
    """Why ``path`` cannot be read as an image, or None when it can. Reads only the header (what
    PIL needs to name the format and size), so a folder of thousands is scanned in seconds."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            if image.size[0] < 1 or image.size[1] < 1:
                return f"it is {image.size[0]}x{image.size[1]} pixels"
    except UnidentifiedImageError:
        return "not an image PIL can read"
    except (OSError, ValueError, SyntaxError) as exc:  # PIL raises SyntaxError for some broken headers
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return None


def _load_image(path: str, mode: str):
    from PIL import Image

    with open(path, "rb") as f:
        return Image.open(f).convert(mode)


def __getattr__(name):
    if name == "ImageFolder":  # torchvision's, imported on first use
        from torchvision.datasets import ImageFolder

        return ImageFolder
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
