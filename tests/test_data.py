import tarfile
import time

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Subset, TensorDataset

from compressor import data
from compressor.errors import ConfigError

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# Created out of alphabetical order: ImageFolder must still number them alphabetically.
SMALL_CLASSES = ["truck", "cat", "airplane"]
SMALL_COUNTS = {"train": 7, "test": 2}


def _write_jpeg(path, seed, size=(32, 32)):
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path, quality=75)


def _small_tarball(folder, seed=0):
    """A real CIFAR-layout tarball with a few random JPEGs per class and split."""
    tree = folder / "tree"
    for split, count in SMALL_COUNTS.items():
        for c, name in enumerate(SMALL_CLASSES):
            for n in range(count):
                _write_jpeg(tree / split / name / f"{n:04d}.jpg", seed * 1000 + c * 100 + n)
    with tarfile.open(folder / data.TARBALL, "w:gz") as tf:
        for split in SMALL_COUNTS:
            tf.add(tree / split, arcname=split)
    return folder


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """(data root, cache folder) of the small tarball, loaded once."""
    root = _small_tarball(tmp_path_factory.mktemp("data"))
    cache = tmp_path_factory.mktemp("cache") / "cifar"
    return root, cache


def _real_tarball():
    path = data.data_dir() / data.TARBALL
    if not path.is_file():
        pytest.skip(f"needs the shared CIFAR-10 data: '{path}' is missing")
    return path


def test_load_split_decodes_every_file_like_pil_in_imagefolder_order(small):
    root, cache = small
    images, labels, classes = data.load_split("train", root, cache)
    assert classes == sorted(SMALL_CLASSES)
    assert images.shape == (7 * 3, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64
    files = sorted((cache / "jpeg" / "train").glob("*/*.jpg"))
    assert len(files) == len(images)
    for i, path in enumerate(files):  # ImageFolder order: class, then file name
        assert classes[labels[i]] == path.parent.name
        pil = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)
        assert torch.equal(images[i], pil)


def test_cache_is_reused_without_the_jpeg_files(small, tmp_path):
    root, _ = small
    cache = tmp_path / "cache"
    first = data.cifar10("test", root, cache=cache)
    tensor_files = list(cache.glob("test-*.pt"))
    assert len(tensor_files) == 1
    # Nothing half-done is left behind: the extracted tree, its marker, the tensor file.
    assert sorted(p.name for p in cache.iterdir()) == ["jpeg", tensor_files[0].name]
    assert (cache / "jpeg" / ".source-sha256").is_file()
    stamp = tensor_files[0].stat().st_mtime_ns
    for jpeg in (cache / "jpeg").rglob("*.jpg"):
        jpeg.unlink()
    second = data.cifar10("test", root, cache=cache)
    assert torch.equal(first.images, second.images)
    assert torch.equal(first.labels, second.labels)
    assert first.classes == second.classes
    assert tensor_files[0].stat().st_mtime_ns == stamp


def test_cache_of_another_tarball_is_refused(small, tmp_path):
    root, cache = small
    data.load_split("train", root, cache)  # cache now holds the first tarball's JPEGs
    other = _small_tarball(tmp_path, seed=1)
    with pytest.raises(ConfigError, match="was not extracted from"):
        data.load_split("train", other, cache)


def test_items_are_normalised_images_and_labels(small):
    root, cache = small
    dataset = data.cifar10("train", root, cache=cache)
    assert len(dataset) == 21 and dataset.classes == sorted(SMALL_CLASSES)
    image, label = dataset[5]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert label == dataset.labels[5]
    mean, std = torch.tensor(data.MEAN), torch.tensor(data.STD)
    pixel = dataset.images[5, :, 3, 4].float() / 255
    torch.testing.assert_close(image[:, 3, 4], (pixel - mean) / std)


def test_data_loader_fetches_whole_batches(small):
    root, cache = small
    dataset = data.cifar10("train", root, cache=cache)
    images, labels = next(iter(DataLoader(dataset, batch_size=8)))
    assert images.shape == (8, 3, 32, 32) and labels.shape == (8,)
    assert torch.equal(images, torch.stack([dataset[i][0] for i in range(8)]))
    assert torch.equal(labels, dataset.labels[:8])


def _all_crops(image, padding):
    padded = torch.nn.functional.pad(image, (padding,) * 4)
    size = image.shape[-1]
    crops = [padded[:, y:y + size, x:x + size] for y in range(2 * padding + 1)
             for x in range(2 * padding + 1)]
    return crops + [crop.flip(-1) for crop in crops]


def test_augment_batch_is_a_padded_crop_and_maybe_a_flip():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    augmented = data.augment_batch(images)
    assert augmented.shape == images.shape and augmented.dtype == torch.uint8
    flipped = 0
    for original, out in zip(images[:16], augmented[:16]):
        crops = _all_crops(original, data.CROP_PADDING)
        match = [i for i, crop in enumerate(crops) if torch.equal(crop, out)]
        assert match, "augmented image is no crop of the padded original"
        flipped += match[0] >= len(crops) // 2
    assert 0 < flipped < 16  # both flipped and unflipped occur (p = 1 - 2^-15)
    assert not torch.equal(data.augment_batch(images), augmented)  # random per call


def test_augmented_dataset_returns_augmented_items(small):
    root, cache = small
    plain = data.cifar10("train", root, cache=cache)
    augmented = data.cifar10("train", root, cache=cache, augment=True)
    torch.manual_seed(1)
    batch = torch.stack([x for x, _ in augmented.__getitems__(list(range(21)))])
    assert batch.shape == (21, 3, 32, 32)
    assert not torch.equal(batch, torch.stack([plain[i][0] for i in range(21)]))


def test_limit_is_class_balanced_and_deterministic(small):
    root, cache = small
    subset = data.cifar10("train", root, limit=7, seed=3, cache=cache)
    assert len(subset) == 7
    assert torch.bincount(subset.labels).tolist() == [3, 2, 2]  # first 7 % 3 classes get one more
    again = data.cifar10("train", root, limit=7, seed=3, cache=cache)
    assert torch.equal(subset.images, again.images)
    two_classes = torch.tensor([0] * 50 + [1] * 50)
    assert not torch.equal(data.balanced_indices(two_classes, 10, seed=3),
                           data.balanced_indices(two_classes, 10, seed=4))
    full = data.cifar10("train", root, cache=cache)
    index = data.balanced_indices(full.labels, 7, seed=3)
    assert torch.equal(subset.images, full.images[index])


@pytest.mark.parametrize("limit", [0, -1, 22])
def test_bad_limit_is_refused(small, limit):
    root, cache = small
    with pytest.raises(ConfigError, match="limit must be in 1..21"):
        data.cifar10("train", root, limit=limit, cache=cache)


def test_limit_beyond_a_class_is_refused():
    with pytest.raises(ConfigError, match="limit 5 needs 2 images of class 1, it has 1"):
        data.balanced_indices(torch.tensor([0, 0, 0, 0, 1]), 5)


def test_train_val_split_is_disjoint_stratified_and_unaugmented(small):
    root, cache = small
    dataset = data.cifar10("train", root, cache=cache, augment=True)
    train, val = data.train_val_split(dataset, 0.3, seed=0)
    assert len(train) + len(val) == len(dataset)
    assert torch.bincount(val.labels).tolist() == [2, 2, 2]  # round(7 * 0.3) per class
    assert train.augment and not val.augment
    pixels = lambda d: {bytes(img.numpy()) for img in d.images}
    assert pixels(train).isdisjoint(pixels(val))
    assert pixels(train) | pixels(val) == pixels(dataset)
    again, val_again = data.train_val_split(dataset, 0.3, seed=0)
    assert torch.equal(val.images, val_again.images)
    _, val_other = data.train_val_split(dataset, 0.3, seed=1)
    assert not torch.equal(val.images, val_other.images)


def test_train_val_split_of_any_dataset_gives_subsets():
    labels = torch.arange(40) % 4
    dataset = TensorDataset(torch.arange(40), labels)  # labels read item by item
    train, val = data.train_val_split(dataset, 0.25, seed=0)
    assert isinstance(train, Subset) and isinstance(val, Subset)
    assert set(train.indices).isdisjoint(val.indices)
    assert sorted(train.indices + val.indices) == list(range(40))
    assert torch.bincount(labels[val.indices]).tolist() == [2, 2, 2, 2]


@pytest.mark.parametrize("fraction", [0, 1, -0.1, 1.5])
def test_bad_val_fraction_is_refused(fraction):
    with pytest.raises(ConfigError, match="val_fraction must be between 0 and 1"):
        data.train_val_split(TensorDataset(torch.zeros(4), torch.zeros(4)), fraction)


def test_missing_tarball_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar10-jpeg.tar.gz' is missing"):
        data.cifar10("train", root=tmp_path, cache=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_unknown_split_is_refused(small):
    with pytest.raises(ConfigError, match="unknown CIFAR-10 split 'val'"):
        data.cifar10("val", small[0], cache=small[1])


def test_data_dir_and_cache_dir_defaults(monkeypatch, tmp_path):
    monkeypatch.delenv("COMPRESSOR_DATA", raising=False)
    monkeypatch.delenv("COMPRESSOR_CACHE", raising=False)
    repo = data._REPO
    assert data.data_dir() == repo.parent / "shared" / "data"
    assert data.cache_dir().parts[-3:] == (".cache", "compressor", "cifar10-jpeg")
    monkeypatch.setenv("COMPRESSOR_DATA", str(tmp_path))
    monkeypatch.setenv("COMPRESSOR_CACHE", str(tmp_path / "c"))
    assert data.data_dir() == tmp_path
    assert data.cache_dir() == tmp_path / "c" / "cifar10-jpeg"
    assert data.data_dir(tmp_path / "x") == tmp_path / "x"
    assert data.cache_dir(tmp_path / "y") == tmp_path / "y"


def test_image_folder_resizes_and_labels(tmp_path):
    for c, name in enumerate(["dog", "ant"]):
        for n in range(3):
            _write_jpeg(tmp_path / name / f"{n}.jpg", c * 10 + n, size=(40, 56))
    dataset = data.image_folder(tmp_path, 32)
    assert dataset.classes == ["ant", "dog"] and len(dataset) == 6
    image, label = dataset[4]
    assert image.shape == (3, 32, 32) and label == 1
    augmented = data.image_folder(tmp_path, 32, augment=True)
    assert augmented[0][0].shape == (3, 32, 32)


def test_image_folder_errors_name_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="'.*nowhere' does not exist"):
        data.image_folder(tmp_path / "nowhere", 32)
    with pytest.raises(FileNotFoundError, match="no images found in .*<class>/<image>.jpg"):
        data.image_folder(tmp_path, 32)
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    with pytest.raises(FileNotFoundError, match="no images found in"):
        data.image_folder(tmp_path, 32)


def test_decode_refuses_mixed_sizes(tmp_path):
    _write_jpeg(tmp_path / "a.jpg", 0, size=(32, 32))
    _write_jpeg(tmp_path / "b.jpg", 1, size=(16, 32))
    with pytest.raises(ConfigError, match="images differ in size"):
        data.decode_images([tmp_path / "a.jpg", tmp_path / "b.jpg"])


def test_real_cifar10_splits():
    _real_tarball()
    test = data.cifar10("test")
    assert test.images.shape == (10000, 3, 32, 32)
    assert test.classes == CIFAR_CLASSES
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    train = data.cifar10("train")
    assert train.images.shape == (50000, 3, 32, 32)
    assert torch.bincount(train.labels).tolist() == [5000] * 10
    small = data.cifar10("train", limit=1000, seed=0)
    assert torch.bincount(small.labels).tolist() == [100] * 10
    # The per-channel means of the training images are CIFAR-10's well-known ones.
    means = train.images.float().mean((0, 2, 3)) / 255
    torch.testing.assert_close(means, torch.tensor([0.491, 0.482, 0.447]), atol=0.005, rtol=0)


def test_real_cached_load_is_much_faster_than_decoding():
    _real_tarball()
    data.load_split("test")  # make sure the cache exists
    start = time.perf_counter()
    images, _, _ = data.load_split("test")
    cached = time.perf_counter() - start
    files = sorted((data.cache_dir() / "jpeg" / "test").glob("*/*.jpg"))
    start = time.perf_counter()
    decoded = data.decode_images(files)
    decoding = time.perf_counter() - start
    assert torch.equal(decoded, images)
    assert cached < decoding / 3, f"cached load {cached:.2f} s vs decoding {decoding:.2f} s"
