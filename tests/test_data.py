"""Data specs, fixed validation splits, deterministic loading and augmentation (no downloads)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rcomp.data import (
    DataBundle,
    DataSpec,
    ImageFileDataset,
    TensorImageDataset,
    augment_batch,
    carve_split,
    fixed_subset,
    load_data,
    make_loader,
    plan_imagefolder,
)
from rcomp.errors import DataError, RcompError

REPO = Path(__file__).resolve().parent.parent
SHARED_CIFAR = REPO.parent / "shared" / "datasets" / "cifar10-jpeg"
CLASSES = ("ant", "bee", "cat")


def make_folder(root: Path, per_class: int = 30, size=(8, 8), mode: str = "RGB", classes=CLASSES) -> Path:
    """``root/<class>/<i>.png`` with seeded random pixels; returns root."""
    rng = np.random.default_rng(len(str(root)))
    channels = 3 if mode == "RGB" else 1
    for cls in classes:
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
            Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode).save(root / cls / f"{i:03d}.png")
    return root


def load(root: Path, **kw) -> DataBundle:
    return load_data(f"imagefolder:{root}", progress=False, **kw)


def paths(dataset) -> set[str]:
    return {dataset.samples[i][0] for i in dataset.indices}


@pytest.fixture(scope="module")
def train_only(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("tf") / "train")


@pytest.fixture(scope="module")
def digits32() -> DataBundle:
    return load_data("digits", (3, 32, 32))


# ---- specs


@pytest.mark.parametrize(
    "spec, kind, size",
    [("digits", "digits", None), ("synthetic", "synthetic", 1000), ("synthetic:64", "synthetic", 64), ("cifar10:/x", "cifar10", None)],
)
def test_parse_good_specs(spec, kind, size):
    parsed = DataSpec.parse(spec)
    assert (parsed.kind, parsed.size) == (kind, size)
    assert DataSpec.parse(str(parsed)) == parsed


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("", "empty data spec"),
        ("mnist", "unknown data spec 'mnist'"),
        ("digit", "did you mean 'digits'"),
        ("digits:5", "takes no argument"),
        ("synthetic:abc", "synthetic:N"),
        ("synthetic:1", "synthetic:N"),
        ("cifar10", "needs a directory"),
        ("imagefolder:", "needs a directory"),
        ("imagefolder:   ", "needs a directory"),
        ("imagefolder:/definitely/not/here", "directory not found"),
    ],
)
def test_parse_bad_specs(spec, expected):
    with pytest.raises(DataError, match=expected) as info:
        DataSpec.parse(spec)
    assert isinstance(info.value, RcompError) and "\n" not in str(info.value)


def test_parse_rejects_files_and_hints_bare_directories(tmp_path):
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(DataError, match="not a directory"):
        DataSpec.parse(f"imagefolder:{tmp_path / 'f.txt'}")
    with pytest.raises(DataError, match=f"write imagefolder:{tmp_path}"):
        DataSpec.parse(str(tmp_path))


# ---- digits and synthetic


def test_digits_rendered_to_cifar_shape(digits32):
    b = digits32
    assert (b.num_classes, b.input_shape, b.augment) == (10, (3, 32, 32), False)
    assert {k: len(v) for k, v in b.splits.items()} == {"train": 1617, "val": 180}
    x, y = b.split("train")[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and isinstance(y, int)
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert torch.equal(x[0], x[1]) and torch.equal(x[0], x[2])  # channel replication
    assert len(set(b.mean)) == 1 and 0 < b.mean[0] < 1 and b.std[0] > 0
    assert set(b.split("train").indices).isdisjoint(b.split("val").indices)


def test_digits_at_native_size_are_exact():
    from sklearn.datasets import load_digits

    b = load_data("digits", (1, 8, 8))
    raw = torch.tensor(load_digits().images, dtype=torch.float32) / 16
    train = b.split("train")
    i = train.indices[5]
    assert torch.equal(train[5][0][0], raw[i])
    assert load_data("digits").input_shape == (1, 8, 8)


def test_synthetic_is_seeded_and_learnable():
    a, b = load_data("synthetic:400", (3, 16, 16)), load_data("synthetic:400", (3, 16, 16))
    xa, ya = a.split("train").get_batch(range(len(a.split("train"))))
    xb, _ = b.split("train").get_batch(range(len(b.split("train"))))
    assert xa.shape == (360, 3, 16, 16) and torch.equal(xa, xb) and 0 <= xa.min() and xa.max() <= 1
    centroids = torch.stack([xa[ya == k].mean(0) for k in range(10)]).flatten(1)
    xv, yv = a.split("val").get_batch(range(40))
    predicted = torch.cdist(xv.flatten(1), centroids).argmin(1)
    assert (predicted == yv).float().mean() > 0.9  # nearest class mean already separates them


# ---- imagefolder: splits


def test_carved_split_sizes_stability_and_disjointness(train_only):
    root = train_only.parent
    a, b = load(root), load(root)
    assert a.classes == list(CLASSES) and a.augment and a.input_shape == (3, 8, 8)
    train, val = a.split("train"), a.split("val")
    assert (len(train), len(val)) == (81, 9)  # 10 % of 90
    assert train.indices == b.split("train").indices and val.indices == b.split("val").indices
    assert set(train.indices).isdisjoint(val.indices)
    assert sorted(train.indices + val.indices) == list(range(90))
    assert any("carved 9 validation images from train (seed 0)" in n for n in a.notes)
    assert len(load(root, val_size=20).split("val")) == 20


def test_carving_rule_is_fixed():
    assert len(carve_split(50_000)[1]) == 5_000  # CIFAR-sized: 45,000 / 5,000
    assert len(carve_split(19_999)[1]) == 2_000
    assert carve_split(1000) == carve_split(1000)
    with pytest.raises(DataError):
        carve_split(10, 10)


def test_order_matches_torchvision_imagefolder(train_only):
    from torchvision.datasets import ImageFolder

    plan = plan_imagefolder(train_only.parent)
    assert plan.files["train"] == ImageFolder(str(train_only)).samples


def test_explicit_val_and_test_folders_are_used(tmp_path):
    make_folder(tmp_path / "train", per_class=10)
    make_folder(tmp_path / "valid", per_class=4, classes=CLASSES[:2])  # a class may be absent
    make_folder(tmp_path / "test", per_class=2)
    b = load(tmp_path, val_size=5, cache=False)
    assert {k: len(v) for k, v in b.splits.items()} == {"train": 30, "val": 8, "test": 6}
    assert all("/valid/" in p for p in paths(b.split("val")))
    assert any("using valid/" in n for n in b.notes) and any("val_size=5 ignored" in n for n in b.notes)
    assert b.split("val").targets == [0] * 4 + [1] * 4  # labels follow train/'s class order


def test_pixels_match_the_files_and_lazy_matches_cached(train_only):
    cached, lazy = load(train_only.parent), load(train_only.parent, cache=False)
    assert isinstance(lazy.split("val"), ImageFileDataset)
    path = lazy.split("val").samples[lazy.split("val").indices[0]][0]
    expected = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1) / 255
    assert torch.allclose(lazy.split("val")[0][0], expected)
    assert torch.allclose(cached.split("val")[0][0], expected)
    assert cached.mean == pytest.approx(lazy.mean) and cached.std == pytest.approx(lazy.std)


def test_loading_one_split_decodes_only_its_images(tmp_path):
    make_folder(tmp_path / "train", per_class=10)
    make_folder(tmp_path / "test", per_class=2)
    whole = load(tmp_path, val_size=6)
    val = load(tmp_path, val_size=6, splits=["val"])
    assert set(val.splits) == {"val"}
    assert torch.equal(val.split("val").get_batch(range(6))[0], whole.split("val").get_batch(range(6))[0])
    assert val.split("val").targets == whole.split("val").targets
    (tmp_path / "train" / "ant" / "000.png").write_bytes(b"broken")  # never read for the test split
    test = load(tmp_path, splits=["test"])
    assert set(test.splits) == {"test"} and len(test.split("test")) == 6
    with pytest.raises(DataError, match=r"no 'nope' split; available: train, test, val"):
        load(tmp_path, splits=["nope"])


def test_a_lone_split_is_loaded_for_val_or_test(tmp_path):
    make_folder(tmp_path, per_class=3)
    assert len(load(tmp_path, splits=["test"]).split("test")) == 9


def test_channels_are_converted_not_sizes(train_only):
    gray = load(train_only.parent, input_shape=(1, 8, 8))
    assert gray.input_shape == (1, 8, 8) and gray.split("train")[0][0].shape == (1, 8, 8)
    with pytest.raises(DataError, match=r"image is 8x8, expected 16x16"):
        load(train_only.parent, input_shape=(3, 16, 16))


def test_class_folders_directly_form_an_evaluation_split(tmp_path):
    make_folder(tmp_path, per_class=3)
    b = load(tmp_path)
    assert list(b.splits) == ["all"] and len(b.split("test")) == 9 and b.split("val") is b.split("all")
    with pytest.raises(DataError, match="no 'train' split; available: all"):
        b.split("train")


# ---- imagefolder: bad inputs


def test_bad_folders(tmp_path):
    with pytest.raises(DataError, match="directory not found"):
        plan_imagefolder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        load(tmp_path / "empty")
    (tmp_path / "hollow" / "a").mkdir(parents=True)
    (tmp_path / "hollow" / "b").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        load(tmp_path / "hollow")
    (tmp_path / "no-classes" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match="train/ holds no class folders"):
        load(tmp_path / "no-classes")


def test_val_with_unknown_class_is_rejected(tmp_path):
    make_folder(tmp_path / "train", per_class=2)
    make_folder(tmp_path / "val", per_class=2, classes=("ant", "dog"))
    with pytest.raises(DataError, match=r"val/ has class folder\(s\) \['dog'\]"):
        load(tmp_path)


def test_wrong_size_image_names_file_and_sizes(tmp_path):
    make_folder(tmp_path / "train", per_class=3)
    odd = tmp_path / "train" / "bee" / "zzz.png"
    Image.new("RGB", (9, 7)).save(odd)
    with pytest.raises(DataError, match=rf"{odd}: image is 9x7, expected 8x8"):
        load(tmp_path)


def test_file_that_is_not_an_image(tmp_path):
    make_folder(tmp_path / "train", per_class=3)
    (tmp_path / "train" / "ant" / "notes.txt").write_text("ignored: no image extension")
    fake = tmp_path / "train" / "cat" / "fake.png"
    fake.write_text("not a png")
    with pytest.raises(DataError, match=rf"{fake}: not a readable image"):
        load(tmp_path)
    fake.unlink()
    assert any("ignored 1 file(s)" in n for n in load(tmp_path).notes)


# ---- cifar10 pickle layout (fake batches: nothing is downloaded)


def write_cifar(root: Path, per_batch: int = 4) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        batch = {"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8), "labels": list(range(per_batch))}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{k}" for k in range(10)]}))
    return root


def test_cifar10_pickles(tmp_path):
    root = write_cifar(tmp_path)
    b = load_data(f"cifar10:{root}")
    assert b.classes[0] == "c0" and b.augment and b.input_shape == (3, 32, 32)
    assert {k: len(v) for k, v in b.splits.items()} == {"train": 18, "val": 2, "test": 4}
    raw = pickle.loads((root / "cifar-10-batches-py" / "test_batch").read_bytes())["data"][1]
    assert torch.equal(b.split("test")[1][0], torch.from_numpy(raw.reshape(3, 32, 32)).float() / 255)
    gray = load_data(f"cifar10:{root / 'cifar-10-batches-py'}", (1, 32, 32))
    assert gray.split("test")[0][0].shape == (1, 32, 32)


def test_cifar10_missing_says_how_to_download(tmp_path):
    with pytest.raises(DataError, match="--download"):
        load_data(f"cifar10:{tmp_path}")
    with pytest.raises(DataError, match="not resized"):
        load_data(f"cifar10:{write_cifar(tmp_path / 'c')}", (3, 16, 16))


# ---- loaders, augmentation, subsets


def order(loader) -> list[int]:
    return torch.cat([y for _, y in loader]).tolist()


def tagged(n: int = 50) -> TensorImageDataset:
    """Label i for image i, so a loader's label stream is its order."""
    return TensorImageDataset(torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2), torch.arange(n))


def test_loader_order_depends_only_on_seed_and_epoch():
    data = tagged()
    state = torch.get_rng_state()
    first = make_loader(data, 8, shuffle=True, seed=3, epoch=1)
    assert order(first) == order(first) == order(make_loader(data, 8, shuffle=True, seed=3, epoch=1))
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is left alone
    assert order(first) != order(make_loader(data, 8, shuffle=True, seed=3, epoch=2))
    assert order(first) != order(make_loader(data, 8, shuffle=True, seed=4, epoch=1))
    assert sorted(order(first)) == list(range(50))
    assert order(make_loader(data, 8, shuffle=False)) == list(range(50))


def test_loader_batches_and_drop_last():
    x, y = next(iter(make_loader(tagged(), 8, shuffle=False)))
    assert x.shape == (8, 1, 2, 2) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x[3, 0, 0, 0] == pytest.approx(3 / 255)
    assert len(make_loader(tagged(), 8, shuffle=True, drop_last=True)) == 6
    plain = torch.utils.data.TensorDataset(torch.zeros(10, 1, 2, 2), torch.arange(10))
    assert order(make_loader(plain, 4, shuffle=False)) == list(range(10))  # datasets without get_batch


def test_augment_batch_crops_and_flips_deterministically():
    x = torch.rand(16, 3, 8, 8)
    out = augment_batch(x, generator=torch.Generator().manual_seed(0))
    again = augment_batch(x, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape and torch.equal(out, again)
    assert not torch.equal(out, augment_batch(x, generator=torch.Generator().manual_seed(1)))
    assert torch.equal(augment_batch(x, padding=0, flip=False), x)
    flipped_only = augment_batch(x, padding=0, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) or torch.equal(a, b.flip(-1)) for a, b in zip(flipped_only, x))
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    cropped_only = augment_batch(x, flip=False, generator=torch.Generator().manual_seed(2))
    for a, p in zip(cropped_only, padded):  # every output is some 8x8 window of the padded image
        windows = p.unfold(1, 8, 1).unfold(2, 8, 1).permute(1, 2, 0, 3, 4).reshape(-1, 3, 8, 8)
        assert any(torch.equal(a, w) for w in windows)


def test_fixed_subset_is_stable():
    data = tagged()
    a, b = fixed_subset(data, 10, seed=0), fixed_subset(data, 10, seed=0)
    assert len(a) == 10 and a.indices == b.indices and isinstance(a, TensorImageDataset)
    assert a.indices != fixed_subset(data, 10, seed=1).indices
    assert fixed_subset(data, 500) is data
    plain = torch.utils.data.TensorDataset(torch.zeros(10, 1), torch.arange(10))
    assert len(fixed_subset(plain, 3)) == 3


# ---- the shared CIFAR-10 JPEG folder (listing only: nothing is decoded)


@pytest.mark.skipif(not (SHARED_CIFAR / "train").is_dir(), reason="../shared/datasets/cifar10-jpeg not present")
def test_shared_cifar10_jpeg_split_sizes():
    plan = plan_imagefolder(SHARED_CIFAR)
    assert plan.sizes() == {"train": 45_000, "val": 5_000}
    assert len(plan.classes) == 10 and plan.classes[0] == "airplane"
    assert "no val/ split: carved 5,000 validation images from train (seed 0)" in plan.notes
