"""Data: Fashion-MNIST offline subset, synthetic data, batch augmentation, clear missing-dataset errors."""
from __future__ import annotations

import pytest
import torch

from nr_study import data as D
from nr_study.config import config_from_dict


def _data(**kw):
    return config_from_dict({"data": kw}).data


@pytest.mark.skipif(not D.FASHION_MNIST_SYSTEM_DIR.is_dir(), reason="Debian dataset-fashion-mnist not installed")
def test_fashion_mnist_subset_offline(tmp_path):
    d = D.build_data(_data(name="fashion_mnist", root=str(tmp_path), n_train=1000, n_test=300))
    assert d.input_shape == (1, 28, 28) and d.num_classes == 10
    assert d.x_train.shape == (1000, 1, 28, 28) and d.x_train.dtype == torch.uint8
    assert d.y_train.shape == (1000,) and d.y_test.shape == (300,)
    assert set(d.y_train.tolist()) == set(range(10))
    x, y = next(d.train_batches(1, 100))
    assert x.shape == (100, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert abs(x.mean().item()) < 0.2 and 0.8 < x.std().item() < 1.2  # normalised
    # seeded subset: same seed same images, another seed other images
    d2 = D.build_data(_data(name="fashion_mnist", root=str(tmp_path), n_train=1000, n_test=300))
    assert torch.equal(d.x_train, d2.x_train)
    d3 = D.build_data(_data(name="fashion_mnist", root=str(tmp_path), n_train=1000, n_test=300, subset_seed=1))
    assert not torch.equal(d.y_train, d3.y_train)
    assert not list(tmp_path.iterdir())  # nothing downloaded


def test_fashion_mnist_missing_says_how(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "nowhere")
    with pytest.raises(D.DatasetNotFoundError) as ei:
        D.build_data(_data(name="fashion_mnist", root=str(tmp_path)))
    msg = str(ei.value)
    assert len(msg.splitlines()) == 1 and "apt-get install dataset-fashion-mnist" in msg and "data.download=true" in msg


def test_cifar_and_imagenet_missing_say_how(tmp_path):
    with pytest.raises(D.DatasetNotFoundError, match=r"cifar10: .*data\.download=true"):
        D.build_data(_data(name="cifar10", root=str(tmp_path)))
    with pytest.raises(D.DatasetNotFoundError, match=r"cifar100: .*cifar-100-python"):
        D.build_data(_data(name="cifar100", root=str(tmp_path)))
    with pytest.raises(D.DatasetNotFoundError, match=r"imagenet: .*train/ and val/"):
        D.build_data(_data(name="imagenet", root=str(tmp_path)))


def test_imagenet_folder(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for c in ("cat", "dog"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (150, 140), color=(i * 40, 20, 200)).save(tmp_path / split / c / f"{i}.png")
    d = D.build_data(_data(name="imagenet", root=str(tmp_path), image_size=128, num_workers=0))
    assert d.num_classes == 2 and d.input_shape == (3, 128, 128) and d.n_train == 6
    x, y = next(d.train_batches(1, 4))
    assert x.shape == (4, 3, 128, 128) and y.shape == (4,)
    xs = [x for x, _ in d.test_batches(4)]
    assert [len(x) for x in xs] == [4, 2] and xs[0].shape[1:] == (3, 128, 128)


def test_synthetic_is_seeded_and_shaped():
    cfg = _data(name="synthetic", n_train=64, n_test=32, synthetic={"shape": [3, 8, 6], "num_classes": 4})
    a, b = D.build_data(cfg), D.build_data(cfg)
    assert a.input_shape == (3, 8, 6) and a.num_classes == 4 and a.n_train == 64 and a.n_test == 32
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    # class means differ: the per-class average images are far apart compared with their spread
    m = torch.stack([a.x_train[a.y_train == k].mean(0) for k in range(4) if (a.y_train == k).any()])
    assert torch.cdist(m.flatten(1), m.flatten(1)).max() > 3


def test_epoch_order_and_augmentation_are_seeded():
    d = D.build_data(_data(name="synthetic", n_train=64, n_test=16, augment=True), seed=3)
    assert d.crop_pad == 2 and d.flip
    e1 = [x for x, _ in d.train_batches(1, 16)]
    e1b = [x for x, _ in d.train_batches(1, 16)]
    e2 = [x for x, _ in d.train_batches(2, 16)]
    assert all(torch.equal(p, q) for p, q in zip(e1, e1b))
    assert not torch.equal(e1[0], e2[0])
    assert len(e1) == 4 and len(list(d.train_batches(1, 16, max_steps=2))) == 2


def test_batch_crop_is_a_shifted_window():
    x = torch.arange(2 * 1 * 5 * 5, dtype=torch.float32).view(2, 1, 5, 5)
    td = D.TensorData("t", x, torch.zeros(2), x, torch.zeros(2), 2, crop_pad=1)
    g = torch.Generator().manual_seed(0)
    out = td._augment(x, g)
    xp = torch.nn.functional.pad(x, (1, 1, 1, 1))
    for i in range(2):  # every output equals some 5x5 window of the padded input
        assert any(torch.equal(out[i], xp[i, :, a:a + 5, b:b + 5]) for a in range(3) for b in range(3))
