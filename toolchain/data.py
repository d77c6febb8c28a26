"""Datasets behind one spec string, and deterministic batching.

Spec strings (the same for every command)::

    digits              scikit-learn's bundled 8x8 digits: no download, the default
    synthetic[:N]       generated, learnable class patterns (N images, default 1000): for tests
    cifar10:DIR         torchvision's CIFAR-10 python-pickle layout under DIR (``download=True`` fetches)
    imagefolder:DIR     DIR/{train,val|valid,test}/<class>/*.png|jpg, or DIR/<class>/* (one split "all")

Every dataset yields ``(float32 C x H x W tensor in [0, 1], int label)``. Loaders never normalize:
the model carries its own ``Normalize`` layer, so an eps of 8/255 means the same thing in the
attacks, in the exported ONNX graph and on the target.

Validation splits that the data does not provide are carved with a fixed seed (0) that does not
depend on the training seed, so every run, resumed run and machine sees the same validation images.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import pickle
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler, SequentialSampler, Subset

from rcomp.errors import DataError
from rcomp.guards import check_input_shape, excerpt

KINDS = ("digits", "synthetic", "cifar10", "imagefolder")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's
SPLIT_SEED = 0
CIFAR_SIZED = 20_000  # training sets at least this large get a fixed 5,000-image validation split
CIFAR_VAL = 5_000
STATS_SAMPLE = 5_000
MAX_CACHE_BYTES = 2 * 1024**3
SYNTHETIC_DEFAULT_SIZE = 1000
_VAL_DIRS = ("val", "valid", "validation")


# --------------------------------------------------------------------------------------------
# Spec
# --------------------------------------------------------------------------------------------


@dataclass
class DataSpec:
    kind: str
    root: str | None = None
    size: int | None = None

    @classmethod
    def parse(cls, spec: str) -> "DataSpec":
        """Parse ``kind[:arg]``; folders of ``imagefolder`` must exist (``cifar10`` may be downloaded)."""
        if not isinstance(spec, str) or not spec.strip():
            raise DataError(f"empty data spec; expected one of {_SPEC_FORMS}")
        kind, sep, arg = spec.strip().partition(":")
        kind = kind.lower()
        if kind not in KINDS:
            raise DataError(_unknown_kind_message(spec, kind))
        if kind == "digits":
            if arg:
                raise DataError(f"data spec {spec!r}: digits takes no argument")
            return cls("digits")
        if kind == "synthetic":
            return cls("synthetic", size=_parse_size(spec, arg) if sep else SYNTHETIC_DEFAULT_SIZE)
        if not arg.strip():
            raise DataError(f"data spec {spec!r}: {kind} needs a directory, e.g. {kind}:/data/cifar10")
        root = os.path.expanduser(arg.strip())
        if kind == "imagefolder":
            _require_dir(root, spec)
        return cls(kind, root=root)

    def __str__(self) -> str:
        if self.kind == "synthetic":
            return f"synthetic:{self.size}"
        return f"{self.kind}:{self.root}" if self.root else self.kind


_SPEC_FORMS = "digits, synthetic[:N], cifar10:DIR, imagefolder:DIR"


def _unknown_kind_message(spec: str, kind: str) -> str:
    if os.path.isdir(os.path.expanduser(spec)):
        return f"data spec {spec!r} is a directory; write imagefolder:{spec} (or cifar10:{spec})"
    close = difflib.get_close_matches(kind, KINDS, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown data spec {spec!r}{hint} expected one of {_SPEC_FORMS}"


def _parse_size(spec: str, arg: str) -> int:
    try:
        n = int(arg)
    except ValueError:
        n = 0
    if n < 2:
        raise DataError(f"data spec {spec!r}: expected synthetic:N with N an integer >= 2")
    return n


def _require_dir(root: str, spec: str) -> None:
    if not os.path.exists(root):
        raise DataError(f"data spec {spec!r}: directory not found: {root}")
    if not os.path.isdir(root):
        raise DataError(f"data spec {spec!r}: not a directory: {root}")


# --------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------


class TensorImageDataset(Dataset):
    """Images held in memory, as a view (``indices``) over a shared base tensor.

    Natural images are kept as uint8 (4x less memory than float) and converted per batch;
    rendered data (digits, synthetic) is kept as float32 because it is not on the uint8 grid.
    """

    def __init__(self, images: Tensor, labels: Tensor, indices: Sequence[int] | Tensor | None = None):
        self.images = images
        self.labels = labels.long()
        n = images.shape[0]
        self._idx = torch.arange(n) if indices is None else torch.as_tensor(indices, dtype=torch.long)

    @property
    def indices(self) -> list[int]:
        """Positions in the base tensor (stable across loads; what split tests compare)."""
        return self._idx.tolist()

    @property
    def targets(self) -> list[int]:
        return self.labels[self._idx].tolist()

    def __len__(self) -> int:
        return len(self._idx)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        # Through get_batch so the caller always gets a fresh tensor, never a view it could corrupt.
        x, y = self.get_batch([i])
        return x[0], int(y[0])

    def get_batch(self, positions: Sequence[int] | Tensor) -> tuple[Tensor, Tensor]:
        """One indexing op per batch instead of one per image: what keeps an epoch's loading cheap."""
        j = self._idx.index_select(0, torch.as_tensor(positions, dtype=torch.long))
        # index_select, not images[j]: the generic advanced-indexing kernel is ~20x slower here.
        return _to_float(self.images.index_select(0, j)), self.labels.index_select(0, j)

    def subset(self, positions: Sequence[int] | Tensor) -> "TensorImageDataset":
        return TensorImageDataset(self.images, self.labels, self._idx[torch.as_tensor(positions, dtype=torch.long)])


def _to_float(x: Tensor) -> Tensor:
    return x.float().div_(255) if x.dtype == torch.uint8 else x.float()


class ImageFileDataset(Dataset):
    """Lazy fallback for folders too large to decode into memory: decodes per item."""

    def __init__(self, samples: list[tuple[str, int]], mode: str, size: tuple[int, int], indices=None):
        self.samples = samples
        self.mode = mode
        self.size = size  # (W, H), PIL order
        self._idx = list(range(len(samples))) if indices is None else [int(i) for i in indices]

    @property
    def indices(self) -> list[int]:
        return list(self._idx)

    @property
    def targets(self) -> list[int]:
        return [self.samples[j][1] for j in self._idx]

    def __len__(self) -> int:
        return len(self._idx)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        path, label = self.samples[self._idx[i]]
        array = _decode(path, self.mode, self.size)
        return torch.from_numpy(array).permute(2, 0, 1).float().div_(255), label

    def subset(self, positions: Sequence[int]) -> "ImageFileDataset":
        return ImageFileDataset(self.samples, self.mode, self.size, [self._idx[int(p)] for p in positions])


# --------------------------------------------------------------------------------------------
# Bundle
# --------------------------------------------------------------------------------------------


@dataclass
class DataBundle:
    name: str
    num_classes: int
    classes: list[str]
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool
    notes: list[str] = field(default_factory=list)
    splits: dict[str, Dataset] = field(default_factory=dict)

    def split(self, name: str) -> Dataset:
        """A split by name; a lone ``all`` split stands in for ``val``/``test`` but never for ``train``."""
        if name in self.splits:
            return self.splits[name]
        if set(self.splits) == {"all"} and name in ("val", "test"):
            return self.splits["all"]
        raise missing_split(self.name, name, list(self.splits))


def missing_split(source: str, name: str, available: list[str]) -> DataError:
    """The error for a split a dataset does not have, with what it has instead."""
    hint = ""
    if name == "train" and "all" in available:
        hint = " (class folders directly under the root form one evaluation split 'all'; put them in train/ to train)"
    return DataError(f"{source}: no {name!r} split; available: {', '.join(available)}{hint}")


# --------------------------------------------------------------------------------------------
# Splits and statistics
# --------------------------------------------------------------------------------------------


def default_val_size(n_train: int) -> int:
    """5,000 for CIFAR-sized sets (the usual CIFAR protocol), else 10 %."""
    if n_train >= CIFAR_SIZED:
        return CIFAR_VAL
    return max(1, round(n_train / 10)) if n_train >= 2 else 0


def carve_split(n: int, val_size: int | None = None, seed: int = SPLIT_SEED) -> tuple[list[int], list[int]]:
    """(train, val) positions, each sorted; a fixed permutation so the split never moves."""
    k = default_val_size(n) if val_size is None else val_size
    if not 0 <= k < n:
        raise DataError(f"cannot carve {k} validation images out of {n}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return sorted(perm[k:].tolist()), sorted(perm[:k].tolist())


def _carve_note(k: int, source: str) -> str:
    what = "no val/ split" if source == "train" else "no validation split"
    return f"{what}: carved {k:,} validation images from {source} (seed {SPLIT_SEED})"


def _channel_stats(dataset: Dataset, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std of a seeded sample of at most 5,000 images (for the Normalize layer)."""
    n = len(dataset)
    if n == 0:
        return (0.5,) * channels, (0.5,) * channels
    take = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))[:STATS_SAMPLE].tolist()
    if hasattr(dataset, "get_batch"):
        x = dataset.get_batch(take)[0]
    else:
        x = torch.stack([dataset[i][0] for i in take])
    x = x.transpose(0, 1).reshape(channels, -1).double()
    std = x.std(dim=1, unbiased=False).clamp_min(1e-3)  # a constant channel must not divide by 0
    return tuple(x.mean(dim=1).tolist()), tuple(std.tolist())


def _finish(
    name: str, classes: list[str], shape, splits: dict[str, Dataset], augment: bool, notes: list[str]
) -> DataBundle:
    stats_from = next(s for s in ("train", "all", "val", "test") if s in splits)
    mean, std = _channel_stats(splits[stats_from], shape[0])
    return DataBundle(name, len(classes), classes, tuple(shape), mean, std, augment, notes, splits)


def _carve_tensor_splits(base: TensorImageDataset, val_size: int | None, source: str, notes: list[str]):
    train_idx, val_idx = carve_split(len(base), val_size)
    notes.append(_carve_note(len(val_idx), source))
    splits = {"train": base.subset(train_idx)}
    if val_idx:
        splits["val"] = base.subset(val_idx)
    return splits


# --------------------------------------------------------------------------------------------
# digits and synthetic
# --------------------------------------------------------------------------------------------


def _check_shape(shape) -> tuple[int, int, int]:
    if shape is None:
        return None  # type: ignore[return-value]
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise DataError(f"input_shape must be (C, H, W) with positive sizes, got {shape}")
    check_input_shape(shape, "input_shape")
    return shape  # type: ignore[return-value]


def _render(x: Tensor, shape: tuple[int, int, int]) -> Tensor:
    """Resize single-channel [N,1,h,w] images to [N,C,H,W]: bilinear, channels replicated."""
    c, h, w = shape
    if x.shape[-2:] != (h, w):
        shrink = h < x.shape[-2] or w < x.shape[-1]
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=shrink)
    return x.clamp_(0, 1).expand(-1, c, -1, -1).contiguous()


def _load_digits(shape, val_size: int | None) -> DataBundle:
    from sklearn.datasets import load_digits

    shape = shape or (1, 8, 8)
    d = load_digits()
    x = _render(torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0, shape)
    base = TensorImageDataset(x, torch.as_tensor(d.target))
    notes = [f"digits: 1,797 8x8 images (0..16 scaled to [0, 1]) rendered to {_fmt(shape)}"]
    splits = _carve_tensor_splits(base, val_size, "the 1,797 digits", notes)
    return _finish("digits", [str(k) for k in range(10)], shape, splits, False, notes)


def _load_synthetic(n: int, shape, val_size: int | None) -> DataBundle:
    """Ten smooth random class prototypes plus per-image contrast and noise: learnable in a few steps."""
    shape = shape or (3, 32, 32)
    c, h, w = shape
    g = torch.Generator().manual_seed(SPLIT_SEED)
    protos = torch.rand(10, c, min(4, h), min(4, w), generator=g)
    protos = F.interpolate(protos, size=(h, w), mode="bilinear", align_corners=False)
    labels = (torch.arange(n) % 10)[torch.randperm(n, generator=g)]
    contrast = torch.empty(n, 1, 1, 1).uniform_(0.6, 1.0, generator=g)
    noise = torch.randn(n, c, h, w, generator=g) * 0.1
    x = (0.5 + (protos[labels] - 0.5) * contrast + noise).clamp_(0, 1)
    notes = [f"synthetic: {n:,} generated images of {_fmt(shape)}, 10 classes (seed {SPLIT_SEED})"]
    splits = _carve_tensor_splits(TensorImageDataset(x, labels), val_size, f"the {n:,} images", notes)
    return _finish(f"synthetic:{n}", [f"pattern{k}" for k in range(10)], shape, splits, False, notes)


def _fmt(shape) -> str:
    return "x".join(str(s) for s in shape)


# --------------------------------------------------------------------------------------------
# cifar10 (python pickle layout)
# --------------------------------------------------------------------------------------------


def _cifar_dir(root: Path) -> Path:
    return root if (root / "data_batch_1").is_file() else root / "cifar-10-batches-py"


def _download_cifar(root: Path) -> None:
    from torchvision.datasets import CIFAR10

    try:
        for train in (True, False):
            CIFAR10(str(root), train=train, download=True)
    except Exception as exc:  # network errors come in many types; one line is what the user needs
        raise DataError(f"cifar10:{root}: download failed: {exc}") from None


#: The only globals a CIFAR-10 python pickle may name. The published batches (written by Python 2's
#: cPickle) use numpy.core.multiarray._reconstruct, numpy.ndarray and numpy.dtype; files re-pickled
#: by numpy 2 name numpy._core, ``_frombuffer`` (protocol 5), ``scalar`` (numpy integers in a label
#: list) and ``_codecs.encode`` (bytes at protocol 2). Any other global (``os.system``,
#: ``builtins.eval``, ...) is refused before it is looked up, so a planted file runs nothing.
_CIFAR_GLOBALS = {
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    *((core, "_reconstruct") for core in ("numpy.core.multiarray", "numpy._core.multiarray")),
    *((core, "scalar") for core in ("numpy.core.multiarray", "numpy._core.multiarray")),
    *((core, "_frombuffer") for core in ("numpy.core.numeric", "numpy._core.numeric")),
}
#: A published CIFAR-10 batch is 31 MB; a file far larger is not one.
_CIFAR_MAX_BYTES = 256 * 1024**2


def _numpy_global(module: str, name: str):
    """The object a whitelisted numpy global names, under numpy 1 (numpy.core) and 2 (numpy._core)."""
    if module == "_codecs":
        return _latin1_bytes
    if module == "numpy":
        return getattr(np, name)
    try:
        from numpy import _core as core  # numpy >= 2 (numpy.core is a deprecated alias there)
    except ImportError:  # numpy 1.x
        from numpy import core  # type: ignore[no-redef]
    return getattr(getattr(core, module.rsplit(".", 1)[1]), name)


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it for bytes (latin-1 only: no codec lookup by name)."""
    if encoding.replace("-", "").lower() != "latin1" or not isinstance(text, str):
        raise pickle.UnpicklingError("refusing _codecs.encode with anything but a latin-1 string")
    return text.encode("latin1")


class _CifarUnpickler(pickle.Unpickler):
    """pickle.Unpickler restricted to the plain types of the CIFAR-10 python format.

    Plain pickle.load executes whatever callable a file names; this one resolves only the
    numpy array constructors in ``_CIFAR_GLOBALS`` (dicts, lists, str, bytes and ints need none).
    """

    def find_class(self, module: str, name: str):
        if (module, name) not in _CIFAR_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {excerpt(module)}.{excerpt(name)}: "
                                         "a CIFAR-10 batch holds only arrays, lists and strings")
        return _numpy_global(module, name)


def _safe_unpickle(path: Path):
    """One CIFAR-10 python pickle, read with the restricted unpickler (never plain pickle.load)."""
    if path.stat().st_size > _CIFAR_MAX_BYTES:
        raise DataError(f"{path}: {path.stat().st_size / 1e6:.0f} MB is not a CIFAR-10 python batch")
    with open(path, "rb") as f:
        return _CifarUnpickler(f, encoding="latin1").load()  # latin1: the batches were written by Python 2


def _cifar_batch(entry, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(images [N, 3, 32, 32] uint8, labels [N]) of one unpickled batch, its layout checked."""
    if not isinstance(entry, dict) or "data" not in entry or "labels" not in entry:
        raise DataError(f"{path}: not a CIFAR-10 python batch (expected a dict with data and labels)")
    data, labels = entry["data"], np.asarray(entry["labels"])
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{path}: not a CIFAR-10 python batch (data must be an N x 3072 uint8 array)")
    if labels.shape != (data.shape[0],) or labels.dtype.kind not in "iu":
        raise DataError(f"{path}: not a CIFAR-10 python batch ({data.shape[0]} images, labels {labels.shape})")
    if labels.size and not (0 <= labels.min() and labels.max() < 10):
        raise DataError(f"{path}: CIFAR-10 labels must be 0..9, found {labels.min()}..{labels.max()}")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _read_cifar(folder: Path, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for name in names:
        try:
            x, y = _cifar_batch(_safe_unpickle(folder / name), folder / name)
        except (OSError, pickle.UnpicklingError, KeyError, ValueError, EOFError, TypeError,
                AttributeError, IndexError, MemoryError) as exc:
            raise DataError(f"{folder / name}: not a CIFAR-10 python batch ({excerpt(str(exc), 120)})") from None
        xs.append(x)
        ys.append(y)
    return np.concatenate(xs), np.concatenate(ys)


def _cifar_channels(x: np.ndarray, c: int) -> np.ndarray:
    """Grayscale with PIL's ITU-R 601-2 luma weights, so cifar10 and imagefolder agree on 'L'."""
    if c == 3:
        return x
    x = x.astype(np.uint32)
    luma = (x[:, 0] * 299 + x[:, 1] * 587 + x[:, 2] * 114 + 500) // 1000
    return luma.astype(np.uint8)[:, None]


def _load_cifar10(spec: DataSpec, shape, download: bool, val_size: int | None) -> DataBundle:
    root = Path(spec.root)
    if download:
        _download_cifar(root)
    folder = _cifar_dir(root)
    train_files = [f"data_batch_{i}" for i in range(1, 6)]
    if not all((folder / f).is_file() for f in train_files):
        raise DataError(
            f"cifar10:{root}: no CIFAR-10 python batches (expected {folder}/data_batch_1..5); "
            "pass --download to fetch them, or use imagefolder:DIR for image files"
        )
    shape = shape or (3, 32, 32)
    if shape[1:] != (32, 32) or shape[0] not in (1, 3):
        raise DataError(
            f"cifar10 images are 32x32, input_shape asks for {_fmt(shape)} "
            "(natural images are not resized; only 1 or 3 channels can be converted)"
        )
    meta = _read_meta(folder)
    x, y = _read_cifar(folder, train_files)
    notes: list[str] = []
    splits = _carve_tensor_splits(_tensor_base(x, y, shape[0]), val_size, f"the {len(y):,} training images", notes)
    if (folder / "test_batch").is_file():
        splits["test"] = _tensor_base(*_read_cifar(folder, ["test_batch"]), shape[0])
    else:
        notes.append("no test_batch: no 'test' split")
    return _finish(f"cifar10:{root}", meta, shape, splits, True, notes)


def _tensor_base(x: np.ndarray, y: np.ndarray, channels: int) -> TensorImageDataset:
    return TensorImageDataset(torch.from_numpy(np.ascontiguousarray(_cifar_channels(x, channels))), torch.from_numpy(y))


def _read_meta(folder: Path) -> list[str]:
    """The class names of ``batches.meta`` (0..9 without one); a meta file that is not one is an error."""
    path = folder / "batches.meta"
    if not path.is_file():
        return [str(k) for k in range(10)]
    try:
        names = _safe_unpickle(path)["label_names"]
    except (OSError, pickle.UnpicklingError, KeyError, ValueError, EOFError, TypeError,
            AttributeError, IndexError, MemoryError) as exc:
        raise DataError(f"{path}: not a CIFAR-10 batches.meta ({excerpt(str(exc), 120)})") from None
    if not isinstance(names, list) or len(names) != 10 or not all(isinstance(n, str) for n in names):
        raise DataError(f"{path}: not a CIFAR-10 batches.meta (label_names must be 10 strings)")
    return [excerpt(n) for n in names]


# --------------------------------------------------------------------------------------------
# imagefolder
# --------------------------------------------------------------------------------------------


@dataclass
class FolderPlan:
    """What an ImageFolder root holds and how it is split, from the file listing alone (no decoding)."""

    root: Path
    classes: list[str]
    files: dict[str, list[tuple[str, int]]]  # physical folder name ('train', 'val', 'all', ...) -> samples
    splits: dict[str, tuple[str, list[int]]]  # logical split -> (physical folder, positions)
    notes: list[str] = field(default_factory=list)

    def sizes(self) -> dict[str, int]:
        return {name: len(pos) for name, (_, pos) in self.splits.items()}


def _subdirs(path: Path) -> list[str]:
    try:
        return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))
    except OSError as exc:
        raise DataError(f"{path}: cannot list: {exc.strerror or exc}") from None


def _walk_images(class_dir: Path, label: int, skipped: list[str]) -> list[tuple[str, int]]:
    """torchvision ImageFolder's order (sorted os.walk, then sorted names), so indices match it."""
    out = []
    for dirpath, _, names in sorted(os.walk(class_dir, followlinks=True)):
        for name in sorted(names):
            path = os.path.join(dirpath, name)
            if name.lower().endswith(IMAGE_EXTENSIONS):
                out.append((path, label))
            else:
                skipped.append(path)
    return out


def _physical_folders(root: Path) -> dict[str, Path]:
    """train/ val|valid|validation/ test/ when present (a split folder holds folders), else {'all': root}."""
    found: dict[str, Path] = {}
    for name, candidates in (("train", ("train",)), ("val", _VAL_DIRS), ("test", ("test",))):
        for c in candidates:
            if (root / c).is_dir() and _subdirs(root / c):
                found[name] = root / c
                break
    if not found and (root / "train").is_dir():
        raise DataError(f"imagefolder:{root}: train/ holds no class folders (expected train/<class>/<image>)")
    return found or {"all": root}


def plan_imagefolder(root: str | os.PathLike, *, val_size: int | None = None) -> FolderPlan:
    """List an ImageFolder root and decide its splits; cheap enough to run on 50,000 files."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"imagefolder:{root}: directory not found")
    folders = _physical_folders(root)
    classes = _plan_classes(root, folders)
    notes: list[str] = []
    skipped: list[str] = []
    files = {name: _list_split(root, path, classes, name, skipped) for name, path in folders.items()}
    if skipped:
        notes.append(f"ignored {len(skipped)} file(s) without an image extension, e.g. {skipped[0]}")
    if "all" in folders:
        notes.append(f"no train/ val/ test/ folders in {root}: its class folders form one split 'all' (evaluation only)")
    splits = {name: (name, list(range(len(samples)))) for name, samples in files.items()}
    if "train" in files and "val" not in files:
        train_idx, val_idx = carve_split(len(files["train"]), val_size)
        splits["train"] = ("train", train_idx)
        if val_idx:
            splits["val"] = ("train", val_idx)
        notes.append(_carve_note(len(val_idx), "train"))
    elif "val" in folders:
        if folders["val"].name != "val":
            notes.append(f"using {folders['val'].name}/ as the validation split")
        if val_size is not None:
            notes.append(f"val_size={val_size} ignored: {folders['val'].name}/ is the validation split")
    return FolderPlan(root, classes, files, splits, notes)


def _plan_classes(root: Path, folders: dict[str, Path]) -> list[str]:
    """Class names come from train/ (or the lone split): label k means the same class in every split."""
    main = folders.get("train") or folders.get("all")
    if main is not None:
        classes = _subdirs(main)
    else:
        classes = sorted({c for p in folders.values() for c in _subdirs(p)})
    if not classes:
        raise DataError(f"imagefolder:{root}: no class folders in {main or root} (expected <class>/<image> files)")
    return classes


def _list_split(root: Path, path: Path, classes: list[str], name: str, skipped: list[str]) -> list[tuple[str, int]]:
    present = _subdirs(path)
    extra = sorted(set(present) - set(classes))
    if extra:
        raise DataError(f"imagefolder:{root}: {path.name}/ has class folder(s) {extra} that train/ does not have")
    samples: list[tuple[str, int]] = []
    for label, cls in enumerate(classes):
        if cls not in present:
            continue
        found = _walk_images(path / cls, label, skipped)
        if not found and name in ("train", "all"):
            raise DataError(f"imagefolder:{root}: class folder {path / cls} holds no images")
        samples += found
    if not samples:
        raise DataError(f"imagefolder:{root}: empty ImageFolder: no images under {path}")
    return samples


# ---- decoding


def _decode(path: str, mode: str, size: tuple[int, int]) -> np.ndarray:
    """One image as [H, W, C] uint8, refusing other sizes: natural images are never resized silently."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            if im.size != size:
                raise DataError(
                    f"{path}: image is {im.size[0]}x{im.size[1]}, expected {size[0]}x{size[1]} "
                    "(natural images are not resized; resize the folder or change the input shape)"
                )
            if im.format == "JPEG":
                im.draft(mode, im.size)  # let libjpeg produce the wanted mode directly
            array = np.array(im.convert(mode))  # a writable copy, torch wants one
    except Image.DecompressionBombError as exc:  # a tiny file that claims gigapixels
        raise DataError(f"{path}: refusing a decompression-bomb image ({exc})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: not a readable image ({exc})") from None
    return array[:, :, None] if array.ndim == 2 else array


def _probe(path: str) -> tuple[int, tuple[int, int]]:
    """(channels, (W, H)) of the first image, read from its header only."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return (1 if im.getbands()[0] in ("1", "L", "I", "F") else 3), im.size
    except Image.DecompressionBombError as exc:
        raise DataError(f"{path}: refusing a decompression-bomb image ({exc})") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"{path}: not a readable image ({exc})") from None


def _decode_all(samples, mode, size, progress: bool, desc: str) -> Tensor:
    """Decode into one [N, C, H, W] uint8 tensor with a small thread pool (PIL releases the GIL)."""
    from tqdm.auto import tqdm

    w, h = size
    out = np.empty((len(samples), h, w, 1 if mode == "L" else 3), dtype=np.uint8)
    chunks = [range(i, min(i + 512, len(samples))) for i in range(0, len(samples), 512)]

    def work(chunk: range) -> int:
        for i in chunk:
            out[i] = _decode(samples[i][0], mode, size)
        return len(chunk)

    pool = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1))
    try:
        with tqdm(total=len(samples), desc=desc, unit="img", disable=not progress, leave=False) as bar:
            for done in pool.map(work, chunks):
                bar.update(done)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # a bad file stops the decode at once
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def _load_imagefolder(spec: DataSpec, shape, val_size, cache: bool, progress: bool, only=None) -> DataBundle:
    plan = plan_imagefolder(spec.root, val_size=val_size)
    if only is not None:
        plan = _keep_splits(plan, only)
    if shape is None:  # take the first training image's size and colour
        channels, size = _probe(next(iter(plan.files.values()))[0][0])
    else:
        channels, size = shape[0], (shape[2], shape[1])
    if channels not in (1, 3):
        raise DataError(f"imagefolder:{plan.root}: input_shape wants {channels} channels; images give 1 (L) or 3 (RGB)")
    mode = "L" if channels == 1 else "RGB"
    shape = (channels, size[1], size[0])
    check_input_shape(shape, f"imagefolder:{plan.root}")
    total = sum(len(s) for s in plan.files.values()) * channels * size[0] * size[1]
    in_memory = cache and total <= MAX_CACHE_BYTES
    bases = {}
    for name, samples in plan.files.items():
        if in_memory:
            x = _decode_all(samples, mode, size, progress, f"decoding {name}/")
            bases[name] = TensorImageDataset(x, torch.tensor([lab for _, lab in samples]))
        else:
            bases[name] = ImageFileDataset(samples, mode, size)
    notes = list(plan.notes)
    if cache and not in_memory:
        notes.append(f"{total / 1e9:.1f} GB decoded would exceed the 2 GB cache: images are decoded per batch")
    splits = {name: bases[folder].subset(pos) for name, (folder, pos) in plan.splits.items()}
    return _finish(f"imagefolder:{plan.root}", plan.classes, shape, splits, True, notes)


def _keep_splits(plan: FolderPlan, only) -> FolderPlan:
    """The plan for the named splits alone: the files no kept split uses are never decoded.

    Evaluating the 5,000 validation images carved from a 50,000-image train/ folder, or a test/
    folder beside it, would otherwise decode every training image first. Positions are renumbered
    within the kept files, so ``indices`` of such a load count in the kept files, not the folder.
    """
    wanted = {name: plan.splits[name] for name in only if name in plan.splits}
    if set(plan.splits) == {"all"} and any(name in ("val", "test") for name in only):
        wanted = dict(plan.splits)  # the lone split stands in for val / test
    if not wanted:  # say so before decoding anything
        raise missing_split(f"imagefolder:{plan.root}", next(iter(only)), list(plan.splits))
    files, splits = {}, {}
    for folder in sorted({folder for folder, _ in wanted.values()}):
        used = sorted({p for f, pos in wanted.values() if f == folder for p in pos})
        renumber = {p: k for k, p in enumerate(used)}
        files[folder] = [plan.files[folder][p] for p in used]
        splits.update({name: (folder, [renumber[p] for p in pos]) for name, (f, pos) in wanted.items() if f == folder})
    return FolderPlan(plan.root, plan.classes, files, splits, plan.notes)


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


def load_data(
    spec: str | DataSpec,
    input_shape: tuple[int, int, int] | None = None,
    *,
    download: bool = False,
    val_size: int | None = None,
    cache: bool = True,
    progress: bool = True,
    splits: Sequence[str] | None = None,
) -> DataBundle:
    """Load a dataset by spec; ``input_shape`` (C, H, W) is what the model wants.

    Digits and synthetic data are rendered to ``input_shape``; natural images must already have
    its size (only the channel count is converted). ``cache=False`` keeps image folders on disk.
    ``splits`` (image folders only) loads just those splits, for evaluation: the channel statistics
    then come from them instead of the training split.
    """
    spec = spec if isinstance(spec, DataSpec) else DataSpec.parse(spec)
    shape = _check_shape(input_shape)
    if spec.kind == "digits":
        return _load_digits(shape, val_size)
    if spec.kind == "synthetic":
        return _load_synthetic(spec.size or SYNTHETIC_DEFAULT_SIZE, shape, val_size)
    if spec.kind == "cifar10":
        return _load_cifar10(spec, shape, download, val_size)
    return _load_imagefolder(spec, shape, val_size, cache, progress, only=splits)


def _derive_seed(seed: int, epoch: int, stream: str) -> int:
    """A 63-bit seed from (seed, epoch, stream), identical on every machine and Python version."""
    digest = hashlib.sha256(f"{seed}:{epoch}:{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class SeededPermutation(Sampler[int]):
    """A shuffle that restarts from its seed on every ``iter``: one (seed, epoch), one order."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed

    def __iter__(self):
        return iter(torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed)).tolist())

    def __len__(self) -> int:
        return self.n


class _BatchView(Dataset):
    """Lets DataLoader fetch a whole batch with one ``get_batch`` call (``__getitems__`` protocol)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        return self.dataset[i]

    def __getitems__(self, indices):
        return self.dataset.get_batch(indices)


def _already_collated(batch):
    return batch


class RankShare(Sampler[list[int]]):
    """This rank's strided share of every global batch: N ranks together see the batches one process would.

    The global order and batches stay those of (seed, epoch), so the recipe (batch size, steps per
    epoch, learning-rate schedule) means the same on 1 or N ranks. A last batch smaller than the
    number of ranks is dropped, so that no rank ever gets an empty batch.
    """

    def __init__(self, batches: BatchSampler, rank: int, world_size: int):
        if not 0 <= rank < world_size or batches.batch_size < world_size:
            raise ValueError(f"rank {rank} of {world_size}: needs 0 <= rank < world_size <= batch_size")
        self.batches, self.rank, self.world_size = batches, rank, world_size

    def __iter__(self):
        for batch in self.batches:
            if len(batch) >= self.world_size:
                yield batch[self.rank :: self.world_size]

    def __len__(self) -> int:
        n, size = len(self.batches.sampler), self.batches.batch_size
        tail = 0 if self.batches.drop_last else n % size
        return n // size + (1 if tail >= self.world_size else 0)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
    epoch: int = 0,
    num_workers: int = 0,
    drop_last: bool = False,
    pin_memory: bool = False,
    rank: int = 0,
    world_size: int = 1,
) -> DataLoader:
    """A DataLoader whose order depends only on (seed, epoch), so a resumed run replays it.

    It never touches the global RNG (DataLoader would draw worker seeds from it otherwise);
    worker seeds come from a generator derived from (seed, epoch) too. With ``world_size > 1``
    it yields rank ``rank``'s share of each ``batch_size`` batch (:class:`RankShare`).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = SeededPermutation(len(dataset), _derive_seed(seed, epoch, "order")) if shuffle else SequentialSampler(dataset)
    batches = BatchSampler(order, batch_size, drop_last)
    if world_size > 1:
        batches = RankShare(batches, rank, world_size)
    workers = torch.Generator().manual_seed(_derive_seed(seed, epoch, "workers"))
    fast = hasattr(dataset, "get_batch")
    return DataLoader(
        _BatchView(dataset) if fast else dataset,
        batch_sampler=batches,
        num_workers=num_workers,
        pin_memory=pin_memory,
        generator=workers,
        collate_fn=_already_collated if fast else None,
    )


def augment_batch(
    x: Tensor, *, padding: int = 4, flip: bool = True, generator: torch.Generator | None = None
) -> Tensor:
    """Random crop (zero padding) and horizontal flip of a whole [B, C, H, W] batch in one gather.

    Random numbers are drawn on the generator's device (CPU by default) and moved to ``x``'s, so
    the same generator state gives the same augmentation on CPU and GPU.
    """
    b, _, h, w = x.shape
    dev = generator.device if generator is not None else torch.device("cpu")
    oy = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=dev).to(x.device)
    ox = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=dev).to(x.device)
    flipped = (torch.rand(b, generator=generator, device=dev) < 0.5).to(x.device) if flip else None
    rows = oy[:, None] + torch.arange(h, device=x.device)  # [B, H]
    cols = torch.arange(w, device=x.device).expand(b, w)
    if flipped is not None:
        cols = torch.where(flipped[:, None], (w - 1) - cols, cols)
    cols = ox[:, None] + cols  # [B, W]
    padded = F.pad(x, (padding, padding, padding, padding))
    batch = torch.arange(b, device=x.device)[:, None, None]
    out = padded[batch, :, rows[:, :, None], cols[:, None, :]]  # [B, H, W, C]
    return out.permute(0, 3, 1, 2).contiguous()


def fixed_subset(dataset: Dataset, n: int, seed: int = 0) -> Dataset:
    """The same ``n`` items on every call (e.g. the val images attacked with PGD each epoch)."""
    if n >= len(dataset):
        return dataset
    pos = sorted(torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n].tolist())
    return dataset.subset(pos) if hasattr(dataset, "subset") else Subset(dataset, pos)
