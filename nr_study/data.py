"""Datasets by name: fashion_mnist (offline idx files), cifar10, cifar100, imagenet (folder), synthetic.
With data.synthetic_stand_in a named dataset is replaced by synthetic data of its shape and class count
(`nr-study sweep --smoke`: the real architecture at the real input size, no files needed).

Small datasets live as tensors on the training device (uint8 images, or float for synthetic) and are
augmented a whole batch at a time: no DataLoader, no workers. ImageNet is an ImageFolder read by a DataLoader.
Shuffling and augmentation of epoch e use a generator seeded by (seed, e) — so a run resumed at an epoch
boundary sees exactly the batches the uninterrupted run saw, whatever happened to the global RNG.

    data = build_data(cfg.data, device, seed=cfg.seed)
    for x, y in data.train_batches(epoch, batch_size): ...
    for x, y in data.test_batches(batch_size): ...
"""
from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F

from nr_study.errors import UserError

FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
STATS = {  # per-channel mean / std in [0, 1] pixel units (torchvision conventions)
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


class DatasetNotFoundError(UserError):
    """A dataset is not where we looked; the message says how to get it."""


def default_data_root() -> Path:
    return Path(os.environ.get("NR_STUDY_DATA") or Path.cwd() / "data").absolute()


# ----------------------------------------------------------------------------------------- tensor data
@dataclass
class TensorData:
    """A dataset held as tensors on one device. Images are NCHW uint8 (normalised per batch) or float."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    mean: Optional[tuple] = None
    std: Optional[tuple] = None
    crop_pad: int = 0  # random crop with this zero padding (0: off)
    flip: bool = False
    seed: int = 0

    @property
    def input_shape(self) -> tuple:
        return tuple(self.x_train.shape[1:])

    @property
    def n_train(self) -> int:
        return int(self.x_train.shape[0])

    @property
    def n_test(self) -> int:
        return int(self.x_test.shape[0])

    @property
    def device(self) -> torch.device:
        return self.x_train.device

    def steps_per_epoch(self, batch_size: int) -> int:
        return max(1, self.n_train // batch_size)  # drop_last: every step sees a full batch

    def _generator(self, epoch: int) -> torch.Generator:
        g = torch.Generator(device="cpu")
        g.manual_seed((self.seed * 1_000_003 + epoch * 7919 + 17) % (2**63))
        return g

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = x.float().div_(255.0)
        if self.mean is not None:
            mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
            std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
            x = (x - mean) / std
        return x

    def _augment(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        n, c, h, w = x.shape
        if self.crop_pad:
            p = self.crop_pad
            xp = F.pad(x, (p, p, p, p))
            oy = torch.randint(0, 2 * p + 1, (n,), generator=g).to(x.device)
            ox = torch.randint(0, 2 * p + 1, (n,), generator=g).to(x.device)
            rows = (oy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
            cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
            idx_n = torch.arange(n, device=x.device)[:, None, None, None]
            idx_c = torch.arange(c, device=x.device)[None, :, None, None]
            x = xp[idx_n, idx_c, rows, cols]
        if self.flip:
            m = (torch.rand(n, generator=g) < 0.5).to(x.device).view(n, 1, 1, 1)
            x = torch.where(m, x.flip(3), x)
        return x

    def train_batches(self, epoch: int, batch_size: int, max_steps: Optional[int] = None) -> Iterator:
        g = self._generator(epoch)
        perm = torch.randperm(self.n_train, generator=g).to(self.device)
        steps = self.steps_per_epoch(batch_size)
        if max_steps is not None:
            steps = min(steps, max_steps)
        for i in range(steps):
            idx = perm[i * batch_size : (i + 1) * batch_size]
            x = self.x_train[idx]
            x = self._augment(x, g) if (self.crop_pad or self.flip) else x
            yield self._prepare(x), self.y_train[idx]

    def test_batches(self, batch_size: int) -> Iterator:
        for i in range(0, self.n_test, batch_size):
            yield self._prepare(self.x_test[i : i + batch_size]), self.y_test[i : i + batch_size]


# --------------------------------------------------------------------------------------- folder data
class LoaderData:
    """ImageNet-style folder data read through DataLoaders (seeded shuffling per epoch)."""

    def __init__(self, name, train_ds, test_ds, num_classes, input_shape, device, num_workers, seed):
        self.name, self.train_ds, self.test_ds = name, train_ds, test_ds
        self.num_classes, self._input_shape = num_classes, tuple(input_shape)
        self._device, self.num_workers, self.seed = torch.device(device), num_workers, seed

    input_shape = property(lambda self: self._input_shape)
    n_train = property(lambda self: len(self.train_ds))
    n_test = property(lambda self: len(self.test_ds))
    device = property(lambda self: self._device)

    def steps_per_epoch(self, batch_size: int) -> int:
        return max(1, self.n_train // batch_size)

    def _loader(self, ds, batch_size, shuffle, g=None):
        return torch.utils.data.DataLoader(
            ds, batch_size=batch_size, shuffle=shuffle, generator=g, drop_last=shuffle,
            num_workers=self.num_workers, pin_memory=self._device.type == "cuda",
            persistent_workers=False,
        )

    def train_batches(self, epoch: int, batch_size: int, max_steps: Optional[int] = None) -> Iterator:
        g = torch.Generator()
        g.manual_seed(self.seed * 1_000_003 + epoch * 7919 + 17)
        for i, (x, y) in enumerate(self._loader(self.train_ds, batch_size, True, g)):
            if max_steps is not None and i >= max_steps:
                break
            yield x.to(self._device, non_blocking=True), y.to(self._device, non_blocking=True)

    def test_batches(self, batch_size: int) -> Iterator:
        for x, y in self._loader(self.test_ds, batch_size, False):
            yield x.to(self._device, non_blocking=True), y.to(self._device, non_blocking=True)


# ------------------------------------------------------------------------------------------ loaders
def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if raw[0] != 0 or raw[1] != 0 or raw[2] != 8:
        raise DatasetNotFoundError(f"{path}: not an idx file of unsigned bytes")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims).copy()


def _find_idx(folder: Path, stem: str) -> Optional[Path]:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def _fashion_dirs(root: Path) -> list[Path]:
    return [root, root / "fashion-mnist", root / "FashionMNIST" / "raw", FASHION_MNIST_SYSTEM_DIR]


def load_fashion_mnist(root: Path, download: bool):
    """(x_train, y_train, x_test, y_test) as uint8/int64 numpy arrays, from idx files found offline."""
    for d in _fashion_dirs(root):
        files = [_find_idx(d, s) for split in ("train", "test") for s in FASHION_FILES[split]]
        if all(files):
            xtr, ytr, xte, yte = (_read_idx(f) for f in files)
            return xtr[:, None], ytr.astype(np.int64), xte[:, None], yte.astype(np.int64)
    if download:
        from torchvision.datasets import FashionMNIST

        try:
            tr = FashionMNIST(str(root), train=True, download=True)
            te = FashionMNIST(str(root), train=False, download=True)
        except Exception as exc:  # network errors and the like
            raise DatasetNotFoundError(f"fashion_mnist: download into {root} failed ({exc})") from None
        return (tr.data.numpy()[:, None], tr.targets.numpy().astype(np.int64),
                te.data.numpy()[:, None], te.targets.numpy().astype(np.int64))
    raise DatasetNotFoundError(
        f"fashion_mnist: idx files not found in {root} or {FASHION_MNIST_SYSTEM_DIR}; install the Debian package "
        f"(apt-get install dataset-fashion-mnist) or set data.download=true to fetch it with torchvision"
    )


def load_cifar(name: str, root: Path, download: bool):
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = CIFAR10 if name == "cifar10" else CIFAR100
    try:
        tr = cls(str(root), train=True, download=download)
        te = cls(str(root), train=False, download=download)
    except RuntimeError as exc:
        folder = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"
        how = (f"download failed ({exc})" if download else
               f"not found ({folder}/ missing); set data.download=true or unpack the python version there")
        raise DatasetNotFoundError(f"{name}: {root}: {how}") from None
    except Exception as exc:
        raise DatasetNotFoundError(f"{name}: {root}: download failed ({exc})") from None

    def arr(ds):
        return ds.data.transpose(0, 3, 1, 2).copy(), np.asarray(ds.targets, dtype=np.int64)

    return (*arr(tr), *arr(te))


def make_synthetic(shape, num_classes: int, n_train: int, n_test: int, noise: float, seed: int):
    """Learnable random data: each class has a smooth random mean image (std 1); samples add Gaussian noise.
    A sample's mean is made from its class's low-resolution draw when drawn (the same values as making every
    class's first): ImageNet's 1000 classes at 224 px would otherwise hold 600 MB of means for a few images."""
    c, h, w = shape
    g = torch.Generator().manual_seed(int(seed) + 12345)
    low = torch.randn(num_classes, c, max(1, min(4, h)), max(1, min(4, w)), generator=g)

    def means(y):
        m = F.interpolate(low[y], size=(h, w), mode="bilinear", align_corners=False) if (h, w) != low.shape[2:] \
            else low[y]
        return m / m.flatten(1).std(dim=1).clamp_min(1e-6).view(-1, 1, 1, 1)

    def draw(n):
        y = torch.randint(0, num_classes, (n,), generator=g)
        x = means(y) + noise * torch.randn(n, c, h, w, generator=g)
        return x, y

    xtr, ytr = draw(n_train)
    xte, yte = draw(n_test)
    return xtr, ytr, xte, yte


def _subset(x, y, n: Optional[int], seed: int, salt: int):
    if n is None or n >= len(y):
        return x, y
    g = torch.Generator().manual_seed(int(seed) * 31 + salt)
    idx = torch.randperm(len(y), generator=g)[:n].sort().values
    return x[idx], y[idx]


IMAGENET_CLASSES = 1000  # what an ImageNet stand-in has; a real ImageNet folder has as many as its class folders
SHAPES = {"fashion_mnist": ((1, 28, 28), 10), "cifar10": ((3, 32, 32), 10), "cifar100": ((3, 32, 32), 100)}


def dataset_shape(dcfg) -> tuple[tuple, int]:
    """(C, H, W) and the class count of the dataset a DataCfg names, without reading it (ImageNet: data.image_size
    and ImageNet-1k's classes): what a synthetic stand-in copies."""
    if dcfg.name == "synthetic":
        return tuple(dcfg.synthetic.shape), int(dcfg.synthetic.num_classes)
    if dcfg.name == "imagenet":
        size = int(dcfg.image_size)
        return (3, size, size), IMAGENET_CLASSES
    return SHAPES[dcfg.name]


def build_data(dcfg, device="cpu", seed: int = 0):
    """Build the dataset named by a DataCfg. `seed` drives shuffling/augmentation; data.subset_seed the subset."""
    device = torch.device(device)
    name = dcfg.name
    root = Path(dcfg.root).expanduser().absolute() if dcfg.root else default_data_root()
    if name == "imagenet" and not dcfg.synthetic_stand_in:
        return _build_imagenet(dcfg, root, device, seed)
    mean = std = None
    crop_pad, flip = 0, False
    if name == "synthetic" or dcfg.synthetic_stand_in:
        shape, num_classes = dataset_shape(dcfg)
        n_tr = dcfg.n_train or 1024
        n_te = dcfg.n_test or 512
        xtr, ytr, xte, yte = make_synthetic(shape, num_classes, n_tr, n_te, dcfg.synthetic.noise, dcfg.subset_seed)
        augment = bool(dcfg.augment)
        crop_pad, flip = (2 if augment else 0), augment
    else:
        if name == "fashion_mnist":
            arrays = load_fashion_mnist(root, dcfg.download)
            num_classes = 10
            augment = bool(dcfg.augment)
            crop_pad, flip = (2 if augment else 0), augment
        elif name in ("cifar10", "cifar100"):
            arrays = load_cifar(name, root, dcfg.download)
            num_classes = 10 if name == "cifar10" else 100
            augment = dcfg.augment is None or dcfg.augment
            crop_pad, flip = (4 if augment else 0), augment
        else:  # validated by config
            raise DatasetNotFoundError(f"data.name: unknown dataset {name!r}")
        xtr, ytr, xte, yte = (torch.from_numpy(np.ascontiguousarray(a)) for a in arrays)
        mean, std = STATS[name]
    xtr, ytr = _subset(xtr, ytr, dcfg.n_train, dcfg.subset_seed, 1)
    xte, yte = _subset(xte, yte, dcfg.n_test, dcfg.subset_seed, 2)
    return TensorData(
        name=name, x_train=xtr.to(device), y_train=ytr.long().to(device), x_test=xte.to(device),
        y_test=yte.long().to(device), num_classes=num_classes, mean=mean, std=std, crop_pad=crop_pad,
        flip=flip, seed=seed,
    )


def _build_imagenet(dcfg, root: Path, device, seed):
    from torchvision import datasets, transforms as T

    tr_dir, va_dir = root / "train", root / "val"
    if not (tr_dir.is_dir() and va_dir.is_dir()):
        raise DatasetNotFoundError(
            f"imagenet: expected an ImageFolder root with train/ and val/ class folders at {root}; set data.root "
            f"to it (ImageNet cannot be downloaded automatically)"
        )
    size = int(dcfg.image_size)
    resize = int(round(size * 256 / 224))
    mean, std = STATS["imagenet"]
    norm = T.Normalize(mean, std)
    augment = dcfg.augment is None or dcfg.augment
    train_tf = T.Compose(
        ([T.RandomResizedCrop(size), T.RandomHorizontalFlip()] if augment else [T.Resize(resize), T.CenterCrop(size)])
        + [T.ToTensor(), norm]
    )
    val_tf = T.Compose([T.Resize(resize), T.CenterCrop(size), T.ToTensor(), norm])
    train_ds = datasets.ImageFolder(str(tr_dir), train_tf)
    val_ds = datasets.ImageFolder(str(va_dir), val_tf)
    if train_ds.classes != val_ds.classes:
        raise DatasetNotFoundError(f"imagenet: train/ and val/ under {root} have different class folders")
    num_classes = len(train_ds.classes)
    train_ds = _subset_ds(train_ds, dcfg.n_train, dcfg.subset_seed, 1)
    val_ds = _subset_ds(val_ds, dcfg.n_test, dcfg.subset_seed, 2)
    return LoaderData("imagenet", train_ds, val_ds, num_classes,
                      (3, size, size), device, dcfg.num_workers, seed)


def _subset_ds(ds, n, seed, salt):
    if n is None or n >= len(ds):
        return ds
    g = torch.Generator().manual_seed(int(seed) * 31 + salt)
    idx = torch.randperm(len(ds), generator=g)[:n].sort().values.tolist()
    return torch.utils.data.Subset(ds, idx)
