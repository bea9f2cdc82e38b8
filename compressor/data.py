"""Image data: CIFAR-10 from the shared JPEG tarball, and a user's own ImageFolder directory.

CIFAR-10 is extracted once, decoded once into a uint8 tensor file per split, and afterwards
loaded from that file in about a second. Augmentation and normalisation run on whole batches of
uint8 tensors, so a training epoch costs almost nothing in data handling.
"""
import hashlib
import os
import shutil
import tarfile
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch.utils.data import Dataset, Subset
from torchvision import transforms
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import default_loader
from torchvision.io import ImageReadMode, decode_jpeg, read_file

from .errors import ConfigError
from .files import atomic_torch_save
from .validate import NamingLoader, labels_of

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
TARBALL = "cifar10-jpeg.tar.gz"
SPLITS = ("train", "test")
# The padded random crop used to train the pretrained CIFAR models: 32 pixels, padding 4.
CROP_PADDING = 4

_REPO = Path(__file__).resolve().parents[1]


def data_dir(path=None):
    """The shared data folder: `path`, else $COMPRESSOR_DATA, else `<repo>/../shared/data`."""
    return Path(path or os.environ.get("COMPRESSOR_DATA") or _REPO.parent / "shared" / "data")


def cache_dir(path=None):
    """Where CIFAR-10 is extracted (`jpeg/`) and its decoded tensors kept: `path`, else
    $COMPRESSOR_CACHE/cifar10-jpeg, else ~/.cache/compressor/cifar10-jpeg."""
    if path:
        return Path(path)
    base = os.environ.get("COMPRESSOR_CACHE") or Path.home() / ".cache" / "compressor"
    return Path(base) / "cifar10-jpeg"


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def extract(tarball, dest, sha256=None):
    """Extract `tarball` into `dest` unless already there; returns `dest`.

    Extracts into a temporary sibling folder and renames it, so a killed run never leaves a
    half-filled `dest`; a marker file records which tarball `dest` came from.
    """
    dest = Path(dest)
    sha256 = sha256 or _sha256(tarball)
    marker = dest / ".source-sha256"
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is ordinary readable data
        try:
            with tarfile.open(tarball, "r:gz") as tf:
                tf.extractall(tmp, filter="data")  # refuses absolute paths, '..', devices
            (tmp / marker.name).write_text(sha256)
            tmp.rename(dest)
        except OSError:
            if not marker.exists():  # not a concurrent run that renamed first
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if not marker.exists() or marker.read_text() != sha256:
        raise ConfigError(
            f"cache folder '{dest}' was not extracted from '{tarball}'; delete it or pass "
            "another cache folder"
        )
    return dest


def decode_images(paths, workers=None):
    """Decode JPEG files into one uint8 tensor (N, 3, H, W); all images must share one size.

    libjpeg-turbo through torchvision gives the same pixels as PIL, several times faster; the
    threads overlap because torch ops release the GIL.
    """
    def decode(chunk):
        data = [read_file(str(p)) for p in chunk]
        return decode_jpeg(data, mode=ImageReadMode.RGB) if data else []

    paths = list(paths)
    workers = workers or min(8, os.cpu_count() or 1)
    chunks = [paths[i::workers] for i in range(workers)]
    with ThreadPoolExecutor(workers) as pool:
        decoded = list(pool.map(decode, chunks))
    images = [None] * len(paths)
    for i, chunk in enumerate(decoded):
        images[i::workers] = chunk
    sizes = {tuple(img.shape) for img in images}
    if len(sizes) > 1:
        raise ConfigError(f"images differ in size ({sorted(sizes)[:3]}...); expected one size")
    return torch.stack(images) if images else torch.empty(0, 3, 0, 0, dtype=torch.uint8)


def load_split(split, root=None, cache=None):
    """CIFAR-10 `split` as (uint8 images (N, 3, 32, 32), int64 labels (N,), class names).

    Reads the decoded tensor file when present; otherwise extracts the tarball, reads the
    split with ImageFolder (classes sorted by name = the official CIFAR-10 label order),
    decodes it and writes the tensor file for next time.
    """
    if split not in SPLITS:
        raise ConfigError(f"unknown CIFAR-10 split '{split}': expected one of {', '.join(SPLITS)}")
    tarball = data_dir(root) / TARBALL
    if not tarball.is_file():
        raise FileNotFoundError(
            f"CIFAR-10 data not found: '{tarball}' is missing (pass root= or set COMPRESSOR_DATA)"
        )
    sha256 = _sha256(tarball)
    folder = cache_dir(cache)
    # Keyed by the tarball's hash, so another tarball never reads a stale cache.
    cached = folder / f"{split}-{sha256[:16]}.pt"
    if cached.is_file():
        saved = torch.load(cached, map_location="cpu", weights_only=True)
        return saved["images"], saved["labels"], saved["classes"]
    found = ImageFolder(extract(tarball, folder / "jpeg", sha256) / split)
    images = decode_images(path for path, _ in found.samples)
    labels = torch.tensor(found.targets, dtype=torch.int64)
    atomic_torch_save({"images": images, "labels": labels, "classes": found.classes}, cached)
    return images, labels, found.classes


def normalize(images):
    """uint8 images (..., 3, H, W) -> float32, scaled to [0, 1] and normalised by MEAN/STD."""
    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)
    return (images.float() / 255 - mean) / std


def augment_batch(images, padding=CROP_PADDING):
    """Random crop (zero padding `padding`) and horizontal flip of a batch (B, C, H, W).

    One gather for the whole batch: each sample's crop offsets and flip become its row and
    column indices into the padded batch. Uses torch's global RNG (seeded per DataLoader worker).
    """
    b, _, h, w = images.shape
    padded = torch.nn.functional.pad(images, (padding,) * 4)
    top = torch.randint(0, 2 * padding + 1, (b, 1))
    left = torch.randint(0, 2 * padding + 1, (b, 1))
    cols = torch.arange(w).expand(b, w)
    cols = torch.where(torch.rand(b, 1) < 0.5, cols.flip(1), cols)
    rows = (top + torch.arange(h))[:, :, None]
    cols = (left + cols)[:, None, :]
    batch = torch.arange(b)[:, None, None]
    return padded[batch, :, rows, cols].permute(0, 3, 1, 2)  # gather yields (B, H, W, C)


class ImageTensorDataset(Dataset):
    """Images held as one uint8 tensor; items are (normalised float image, int64 label).

    Like a TensorDataset, but stored at a quarter of the memory, and with `__getitems__` so a
    DataLoader fetches (and augments) a whole batch in one call.
    """

    def __init__(self, images, labels, classes, augment=False):
        if len(images) != len(labels):
            raise ConfigError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels, self.classes, self.augment = images, labels, list(classes), augment

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return self.__getitems__([index])[0]

    def __getitems__(self, indices):
        images = self.images[indices]
        if self.augment:
            images = augment_batch(images)
        return list(zip(normalize(images), self.labels[indices]))

    def subset(self, indices, augment=None):
        """A dataset of the items at `indices`; `augment` defaults to this dataset's."""
        augment = self.augment if augment is None else augment
        return ImageTensorDataset(self.images[indices], self.labels[indices], self.classes, augment)


def balanced_indices(labels, limit, seed=0):
    """`limit` indices, spread evenly over the classes (the first `limit % C` classes get one
    more), drawn at random with `seed`; returned in ascending order."""
    labels = torch.as_tensor(labels)
    classes = labels.unique()
    if not 0 < limit <= len(labels):
        raise ConfigError(f"limit must be in 1..{len(labels)}, got {limit}")
    generator = torch.Generator().manual_seed(seed)
    picked = []
    for i, c in enumerate(classes.tolist()):
        members = (labels == c).nonzero().flatten()
        count = limit // len(classes) + (i < limit % len(classes))
        if count > len(members):
            raise ConfigError(f"limit {limit} needs {count} images of class {c}, it has {len(members)}")
        picked.append(members[torch.randperm(len(members), generator=generator)[:count]])
    return torch.cat(picked).sort().values


def cifar10(split="train", root=None, limit=None, seed=0, augment=False, cache=None):
    """CIFAR-10 from `<root>/cifar10-jpeg.tar.gz` as an ImageTensorDataset.

    `limit`: keep a class-balanced subset of that many images, chosen by `seed`.
    `augment`: random crop 32 with padding 4 and horizontal flip, for training.
    `cache`: the cache folder (default ~/.cache/compressor/cifar10-jpeg).
    """
    images, labels, classes = load_split(split, root, cache)
    dataset = ImageTensorDataset(images, labels, classes, augment)
    return dataset if limit is None else dataset.subset(balanced_indices(labels, limit, seed))


def train_val_split(dataset, val_fraction, seed=0, labels=None):
    """Split TRAINING data into (train, val), stratified by class, deterministic in `seed`.

    The val part is for scoring candidates during the search, never the test set. For an
    ImageTensorDataset the val part is never augmented; for other datasets both parts are
    Subsets sharing the dataset's transform (split an un-augmented copy with the same seed to
    get an un-augmented val part: the indices depend only on the labels and `seed`). `labels`:
    the dataset's labels when the caller has them (else read from it).
    """
    if not 0 < val_fraction < 1:
        raise ConfigError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    labels = labels_of(dataset) if labels is None else torch.as_tensor(labels)
    generator = torch.Generator().manual_seed(seed)
    train, val = [], []
    for c in labels.unique().tolist():
        members = (labels == c).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        cut = round(len(members) * val_fraction)
        val.append(members[:cut])
        train.append(members[cut:])
    train, val = torch.cat(train).sort().values, torch.cat(val).sort().values
    if isinstance(dataset, ImageTensorDataset):
        return dataset.subset(train), dataset.subset(val, augment=False)
    return Subset(dataset, train.tolist()), Subset(dataset, val.tolist())


def image_folder(path, image_size, augment=False):
    """A user's ImageFolder directory (`<path>/<class>/<image>`) as normalised tensors.

    Images are resized (shorter side) and centre-cropped to `image_size`; `augment` adds the
    CIFAR recipe scaled to the size: random crop with padding image_size // 8, horizontal flip.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"image folder '{path}' does not exist or is not a folder")
    steps = [transforms.Resize(image_size), transforms.CenterCrop(image_size)]
    if augment:
        steps += [transforms.RandomCrop(image_size, padding=image_size // 8),
                  transforms.RandomHorizontalFlip()]
    steps += [transforms.ToTensor(), transforms.Normalize(MEAN, STD)]
    try:
        # a corrupt file fails when read, naming the file
        return ImageFolder(path, transform=transforms.Compose(steps), loader=NamingLoader(default_loader))
    except FileNotFoundError as exc:  # no class folders, or no images in them
        raise FileNotFoundError(
            f"no images found in '{path}': expected <folder>/<class>/<image>.jpg ({exc})"
        ) from exc
