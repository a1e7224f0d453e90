"""Datasets: Fashion-MNIST (test split bundled, train split from disk) and ImageFolder.

Fashion-MNIST is decoded once into a uint8 tensor and normalized in one vectorized step, so a
full pass over the 60k training images costs almost nothing next to the model.
"""
from __future__ import annotations

import gzip
from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from maskaq._files import atomic_write

__all__ = ["FMNIST_MEAN", "FMNIST_STD", "FMNIST_CLASSES", "DEBIAN_FMNIST_ROOT", "BUNDLED_TEST_NPZ",
           "FashionMNIST", "fashion_mnist", "read_idx", "ImageFolder", "image_folder"]

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


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class ImageFolder(Dataset):
    """Images in one sub-directory per class (sorted names -> labels 0..K-1), timm-style eval
    preprocessing: resize the short side to size / crop_pct, center crop, normalize.

    Plain PIL + numpy, so no torchvision is needed. `classes`, `class_to_idx` and `samples`
    follow torchvision's ImageFolder.
    """

    def __init__(self, root, input_size: Sequence[int] = (3, 224, 224), mean=(0.485, 0.456, 0.406),
                 std=(0.229, 0.224, 0.225), interpolation: str = "bicubic", crop_pct: float = 0.875):
        from PIL import Image

        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"ImageFolder path {root} is not a directory "
                                    "(expected one sub-directory of images per class)")
        if len(input_size) != 3:
            raise ValueError(f"input_size must be (C, H, W), got {tuple(input_size)}")
        self.channels, self.height, self.width = (int(v) for v in input_size)
        if self.channels not in (1, 3):
            raise ValueError(f"input_size must have 1 or 3 channels, got {tuple(input_size)}")
        if len(mean) != self.channels or len(std) != self.channels:
            raise ValueError(f"mean/std need {self.channels} values for input_size {tuple(input_size)}, "
                             f"got {tuple(mean)}, {tuple(std)}")
        if not 0 < crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
        modes = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}
        if interpolation not in modes:
            raise ValueError(f"interpolation must be one of {sorted(modes)}, got {interpolation!r}")
        self.resample = modes[interpolation]
        self.crop_pct = float(crop_pct)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.classes = sorted(d.name for d in root.iterdir() if d.is_dir())
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        self.samples = [(str(f), self.class_to_idx[c]) for c in self.classes
                        for f in sorted((root / c).rglob("*")) if f.suffix.lower() in IMAGE_EXTENSIONS]
        if not self.samples:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in class "
                                    f"sub-directories of {root}")
        self.targets = [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, path: str) -> torch.Tensor:
        from PIL import Image

        with Image.open(path) as im:
            im = im.convert("L" if self.channels == 1 else "RGB")
            scale = min(self.height, self.width) / self.crop_pct / min(im.size)
            size = (max(self.width, round(im.size[0] * scale)), max(self.height, round(im.size[1] * scale)))
            im = im.resize(size, self.resample)
            left, top = (size[0] - self.width) // 2, (size[1] - self.height) // 2
            im = im.crop((left, top, left + self.width, top + self.height))
            array = np.asarray(im, dtype=np.float32) / 255.0
        x = torch.from_numpy(array.reshape(self.height, self.width, self.channels).copy()).permute(2, 0, 1)
        return (x - self.mean) / self.std

    def __getitem__(self, index):
        path, label = self.samples[index]
        return self.load(path), label


def image_folder(path, input_size: Sequence[int] = (3, 224, 224), mean=(0.485, 0.456, 0.406),
                 std=(0.229, 0.224, 0.225), interpolation: str = "bicubic", crop_pct: float = 0.875) -> ImageFolder:
    """An ImageFolder validation set (see ImageFolder); pass a model's pretrained_cfg values."""
    return ImageFolder(path, input_size, mean, std, interpolation, crop_pct)
