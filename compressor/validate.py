"""What compress() checks before any expensive work (the checks every loop makes on its batches are
in batches.py).

Each failure is a ConfigError (a CompressorError) whose message names the problem and the fix.
The README section "What compress() checks" lists them.
"""
from __future__ import annotations

import copy
import inspect
import logging
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset, TensorDataset
from torch.utils.data._utils.collate import default_collate
from torchvision.datasets import DatasetFolder

from .batches import explain, check_labels, logits, read_batches
from .errors import CompressorError, ConfigError
from .space import check_model as check_module
from .tasks import check_task

log = logging.getLogger("compressor")
PROBE_ITEMS = 8  # items read up front, spread over a dataset, to check their type, size and labels


# -- the model --------------------------------------------------------------------------------
def check_model(model):
    check_module(model, torch.zeros(1))  # an nn.Module, not TorchScript
    if next(model.parameters(), None) is None:
        raise ConfigError("model has no parameters: nothing to compress")


def model_classes(model, example, output_fn=None):
    """The model's class count, from eval- and train-mode forwards of a copy (the train-mode one
    checks that output_fn also picks the logits there: GoogLeNet returns aux logits only then)."""
    probe = copy.deepcopy(model)
    example = example.to(next(probe.parameters()).device)
    counts = {}
    for mode in ("eval", "train"):
        probe.train(mode == "train")
        x = example if mode == "eval" else example.expand(2, *example.shape[1:])  # batch norms need 2
        try:
            with torch.no_grad():
                out = probe(x)
        except Exception as e:
            raise ConfigError(f"the model's {mode}-mode forward pass failed on an input of shape "
                              f"{tuple(x.shape)}: {type(e).__name__}: {e}. Pass example_input= the model "
                              "accepts, e.g. torch.randn(1, 3, 224, 224)") from e
        try:
            out = logits(out, output_fn)
        except ConfigError as e:
            raise ConfigError(f"in {mode} mode, {e}") from None
        if out.dim() != 2 or out.shape[0] != x.shape[0]:
            raise ConfigError(f"in {mode} mode the model's logits have shape {tuple(out.shape)}; compress needs "
                              f"(batch, classes) logits of a classifier (use output_fn to pick them)")
        counts[mode] = out.shape[-1]
    if counts["eval"] != counts["train"]:
        raise ConfigError(f"the model gives {counts['eval']} logits in eval mode but {counts['train']} in train "
                          "mode: pass output_fn picking the same logits in both")
    return counts["eval"]


# -- data -------------------------------------------------------------------------------------
@dataclass
class LoaderOptions:
    """How batches are made: the user's DataLoader settings, or compress()'s batch_size."""
    batch_size: int
    workers: int = 0
    collate: object = None

    def loader(self, dataset, shuffle=False, seed=0):
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle, drop_last=shuffle,
                          num_workers=self.workers, collate_fn=self.collate or default_collate,
                          generator=torch.Generator().manual_seed(seed) if shuffle else None)


def as_dataset(data, name, batch_size):
    """(map-style dataset, LoaderOptions) from a Dataset or a DataLoader (whose batch size,
    workers and collate function are kept; its sampler is not: compress orders the data itself)."""
    options = LoaderOptions(batch_size)
    if isinstance(data, DataLoader):
        if data.batch_size is None:
            raise ConfigError(f"{name} is a DataLoader with batch_size=None (a batch sampler): pass the dataset, "
                              "or a DataLoader with a batch_size")
        options = LoaderOptions(data.batch_size, data.num_workers, data.collate_fn)
        data = data.dataset
    if isinstance(data, DatasetFolder) and not isinstance(data.loader, NamingLoader):
        data = copy.copy(data)  # the user's dataset keeps its own loader
        data.loader = NamingLoader(data.loader)
    if isinstance(data, IterableDataset):
        raise ConfigError(f"{name} is an IterableDataset: compress needs a map-style Dataset (__len__ and "
                          "__getitem__) to hold out a search split and to shuffle; materialise it or wrap it")
    if not (isinstance(data, Dataset) or hasattr(data, "__getitem__")) or not hasattr(data, "__len__"):
        raise ConfigError(f"{name} must be a torch Dataset of (image, label) or a DataLoader, got {type(data).__name__}")
    if len(data) == 0:
        raise ConfigError(f"{name} is empty: compress needs {'the training data' if name == 'train_data' else 'data'}")
    return data, options


class NamingLoader:
    """A DatasetFolder's file loader whose failures name the file (PIL's 'image file is truncated'
    does not)."""

    def __init__(self, load):
        self.load = load

    def __call__(self, path):
        try:
            return self.load(path)
        except CompressorError:
            raise
        except Exception as e:
            raise ConfigError(f"cannot read image '{path}': {type(e).__name__}: {e}; remove or replace the file") from e


def probe_batch(dataset, options, name):
    """A batch of up to PROBE_ITEMS items spread over `dataset`, collated as training will collate
    them, checked to be (float images, integer labels)."""
    n = len(dataset)
    indices = sorted({round(i * (n - 1) / max(1, PROBE_ITEMS - 1)) for i in range(min(n, PROBE_ITEMS))})
    items = []
    for i in indices:
        try:
            items.append(dataset[i])
        except CompressorError:
            raise
        except Exception as e:
            raise ConfigError(f"{name}: reading item {i} failed: {explain(e)}") from e
    first = items[0]
    try:
        batch = (options.collate or default_collate)(items)
    except Exception as e:
        raise ConfigError(f"{name}: items cannot be batched ({_item_kind(first)}): {explain(e)}. "
                          + _item_advice(first)) from e
    if isinstance(batch, dict) or not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise ConfigError(f"{name}: batches are {_item_kind(batch)}, not (images, labels). " + _item_advice(first))
    x, y = batch
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise ConfigError(f"{name}: batches hold {type(x).__name__} and {type(y).__name__}, not tensors. "
                          + _item_advice(first))
    if not x.is_floating_point():
        raise ConfigError(f"{name}: images are {x.dtype} tensors of shape {tuple(x.shape[1:])}"
                          f"{' (numpy arrays)' if _is_numpy(first[0]) else ''}; the model needs float (C, H, W) "
                          "images: convert them, e.g. transforms.ToTensor() and transforms.Normalize(...)")
    return x, y


def _is_numpy(value):
    return type(value).__module__ == "numpy"


def _item_kind(item):
    if isinstance(item, dict):
        return f"dicts with keys {list(item)}"
    if isinstance(item, (tuple, list)):
        return f"{type(item).__name__}s of ({', '.join(type(v).__name__ for v in item)})"
    return type(item).__name__


def _item_advice(item):
    image = item[0] if isinstance(item, (tuple, list)) and item else None
    if isinstance(item, dict):
        return ("compress needs (image, label) items: wrap the dataset to return them, or pass a DataLoader "
                "whose collate_fn returns (images, labels)")
    if type(image).__module__.startswith("PIL"):
        return "Items are PIL images: add transforms.ToTensor() (and Normalize) to the dataset's transform"
    if _is_numpy(image):
        return "Items are numpy arrays: convert them to float (C, H, W) tensors (e.g. transforms.ToTensor())"
    return "compress needs (image tensor, integer label) items"


def known_labels(dataset):
    """All labels of `dataset` without reading its images, when it keeps them (ImageFolder,
    CIFAR, TensorDataset, ImageTensorDataset, Subsets of those); None otherwise."""
    if isinstance(dataset, Subset):
        parent = known_labels(dataset.dataset)
        return None if parent is None else parent[torch.as_tensor(dataset.indices, dtype=torch.long)]
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) == 2:
        return dataset.tensors[1]
    for attr in ("targets", "labels"):
        value = getattr(dataset, attr, None)
        if value is not None and not callable(value):
            transform = getattr(dataset, "target_transform", None)
            try:
                labels = torch.as_tensor([transform(int(v)) for v in value] if transform else value)
            except Exception:  # a target_transform to something else than class indices
                return None
            return labels if labels.dim() == 1 and len(labels) == len(dataset) else None
    return None


def labels_of(dataset, collate=None):
    """All labels: known_labels, or read through `collate` (one pass over the data)."""
    labels = known_labels(dataset)
    if labels is not None:
        return labels
    collate = collate or default_collate
    try:
        return torch.cat([torch.as_tensor(collate([dataset[j] for j in range(i, min(i + 64, len(dataset)))])[1])
                          for i in range(0, len(dataset), 64)])
    except CompressorError:
        raise
    except Exception as e:
        raise ConfigError(f"cannot read the labels of the data: {explain(e)}") from e


def class_names(dataset):
    """The dataset's class names (`classes`, as ImageFolder and CIFAR have), through Subsets."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    names = getattr(dataset, "classes", None)
    return list(names) if isinstance(names, (list, tuple)) else None


def check_labels_fit(labels, classes, name):
    check_labels(labels, classes, name)
    found = labels.unique()
    if name == "train_data" and len(found) < 2:
        raise ConfigError(f"train_data has only one class (label {int(found[0])}): a classifier needs at least "
                          "two; check the folder layout (<folder>/<class>/<image>)")


def check_same_classes(train, val):
    a, b = class_names(train), class_names(val)
    if a is None or b is None or a == b:
        return
    only_train, only_val = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    detail = "; ".join(part for part in (f"only in train_data: {only_train}" if only_train else "",
                                          f"only in val_data: {only_val}" if only_val else "") if part)
    raise ConfigError(f"train_data and val_data have different classes ({detail or 'same names, another order'}): "
                      "labels are indices into each folder's own sorted class list, so they would not match; "
                      "give both folders the same class folders")


# -- options ----------------------------------------------------------------------------------
def check_batch_size(batch_size):
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")


def check_device(device):
    """torch.device for `device` (default: cuda when available), or a ConfigError."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"bad device {device!r}: use 'cpu', 'cuda' or 'cuda:N' ({e})") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device={str(device)!r} but torch {torch.__version__} sees no CUDA GPU: pass "
                              "device='cpu', or install a CUDA build of torch on a machine with a GPU")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device={str(device)!r} but only {torch.cuda.device_count()} GPU(s) are visible")
    elif device.type != "cpu":
        raise ConfigError(f"device {str(device)!r} is not supported: use 'cpu' or 'cuda'")
    return device


def check_latency_options(options):
    """`latency_options` keys: build_latency_model's own and the latency Target's."""
    from .latency import Target, build_latency_model
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise ConfigError(f"latency_options must be a dict, got {type(options).__name__}")
    set_by_compress = {"model", "space", "target", "progress", "attach", "target_options"}
    valid = {p for p in inspect.signature(build_latency_model).parameters} - set_by_compress
    valid |= {p for p in inspect.signature(Target).parameters} - {"runtime", "input_shape"}
    unknown = sorted(set(options) - valid)
    if unknown:
        raise ConfigError(f"unknown latency_options {unknown}: valid keys are {', '.join(sorted(valid))}")
    return options


# -- compress()'s inputs, all at once ---------------------------------------------------------
@dataclass
class Inputs:
    train: object           # map-style datasets
    val: object
    options: LoaderOptions  # batch size, workers, collate of train_data
    val_loader: object      # batches of val_data: the user's DataLoader, or one made with `options`
    example: torch.Tensor   # one sample (1, C, H, W): costs are per sample
    classes: int
    device: torch.device
    labels: torch.Tensor    # of train


def check_inputs(model, train_data, val_data, *, example_input, batch_size, device, output_fn,
                 latency_options, search_fraction) -> Inputs:
    """Everything about compress()'s inputs that can be known before any training; see the README
    section "What compress() checks"."""
    device = _check_options(model, train_data, batch_size, device, output_fn, latency_options, search_fraction)
    user_batch = batch_size
    train, options = as_dataset(train_data, "train_data", batch_size)
    x, _ = probe_batch(train, options, "train_data")
    example = _example(example_input, x)
    classes = model_classes(model, example, output_fn)

    labels = labels_of(train, options.collate)
    check_labels_fit(labels, classes, "train_data")
    val = val_loader = None
    if val_data is not None:
        val, val_options = as_dataset(val_data, "val_data", batch_size)
        probe_batch(val, val_options, "val_data")
        val_loader = val_data if isinstance(val_data, DataLoader) else options.loader(val)
        check_same_classes(train, val)
        val_labels = known_labels(val)
        if val_labels is not None:  # otherwise each batch is checked as the original's accuracy is measured
            check_labels_fit(val_labels, classes, "val_data")
    names = class_names(train)
    if names is not None and len(names) != classes:
        log.warning("train_data has %d classes but the model has %d outputs", len(names), classes)
    if options.batch_size != user_batch:
        log.info("using the DataLoader's batch size %d", options.batch_size)
    return Inputs(train, val, options, val_loader, example, classes, device, labels)


def _check_options(model, train_data, batch_size, device, output_fn, latency_options, search_fraction):
    """The checks of compress()'s arguments that read no data; returns the torch.device."""
    check_model(model)
    check_batch_size(batch_size)
    device = check_device(device)
    check_latency_options(latency_options)
    if output_fn is not None and not callable(output_fn):
        raise ConfigError(f"output_fn must be a function of the model's output, got {type(output_fn).__name__}")
    if not isinstance(search_fraction, (int, float)) or not 0 < search_fraction < 1:
        raise ConfigError(f"search_fraction must be between 0 and 1 (the share of train_data held out to score "
                          f"candidates), got {search_fraction!r}")
    if train_data is None:
        raise ConfigError("train_data is empty: compress needs the user's training data")
    return device


def _example(example_input, images):
    """One sample (1, C, ...): the first of `example_input`, by default the first of `images`."""
    if example_input is None:
        example_input = images[:1]
    elif not isinstance(example_input, torch.Tensor):
        raise ConfigError(f"example_input must be a torch.Tensor (e.g. torch.randn(1, 3, 224, 224)), got "
                          f"{type(example_input).__name__}")
    elif example_input.dim() < 2 or not example_input.is_floating_point() or not example_input.numel():
        raise ConfigError(f"example_input must be a float batch (N, C, ...) such as torch.randn(1, 3, 224, 224), "
                          f"got {example_input.dtype} of shape {tuple(example_input.shape)}")
    return example_input[:1].detach()


def check_task_inputs(task, model, train_data, val_data, *, example_input, batch_size, device, output_fn,
                      latency_options, search_fraction) -> Inputs:
    """check_inputs for a task other than classification: the same checks of the arguments, then
    the task run once on the first training batch (tasks.check_task); no labels to check (the
    held-out split is a random one, `labels` all 0). A Dataset is batched with the task's collate."""
    device = _check_options(model, train_data, batch_size, device, output_fn, latency_options, search_fraction)
    if output_fn is not None:
        raise ConfigError(f"output_fn picks a classifier's logits; with task {task.name!r} the task's loss and "
                          "score read the model's output: leave output_fn out")
    train, options = as_dataset(train_data, "train_data", batch_size)
    if not isinstance(train_data, DataLoader):
        options.collate = task.collate
    first = next(iter(read_batches(options.loader(train), "train_data")))
    example = _example(example_input, check_task(task, model, first, device).cpu())
    val = val_loader = None
    if val_data is not None:
        val, _ = as_dataset(val_data, "val_data", batch_size)
        val_loader = val_data if isinstance(val_data, DataLoader) else options.loader(val)
    return Inputs(train, val, options, val_loader, example, 0, device, torch.zeros(len(train), dtype=torch.long))


def check_split(fit, held_out, options, search_fraction):
    """The held-out search split must hold a sample, the rest a training batch."""
    if len(held_out) == 0:
        raise ConfigError(f"search_fraction={search_fraction} of {len(fit)} training samples holds out none to "
                          f"score candidates: raise search_fraction or give more training data")
    if len(fit) < options.batch_size:
        raise ConfigError(f"after holding out search_fraction={search_fraction} ({len(held_out)} samples), "
                          f"{len(fit)} training samples are fewer than one batch of {options.batch_size}: "
                          "lower batch_size or search_fraction")
