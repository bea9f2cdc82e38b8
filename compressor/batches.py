"""What every loop does with a batch: pick the logits from the model's output, check the labels,
and turn a failure to read a batch into an error naming it. Used by training, search, fine-tuning,
evaluation and Taylor importance; compress()'s up-front checks are in validate.py."""
from __future__ import annotations

import torch

from .errors import CompressorError, ConfigError


def logits(out, output_fn=None):
    """The logits in a model's output: the output itself when it is a tensor, else `output_fn(out)`
    (GoogLeNet and Inception return a tensor in eval mode but a tuple of logits and aux logits in
    train mode, so `output_fn=lambda out: out.logits` serves both)."""
    if output_fn is not None and not isinstance(out, torch.Tensor):
        out = output_fn(out)
    if not isinstance(out, torch.Tensor):
        fields = f" with fields {list(out._fields)}" if hasattr(out, "_fields") else (
            f" with keys {list(out)}" if isinstance(out, dict) else "")
        raise ConfigError(
            f"the model returned a {type(out).__name__}{fields}, not a tensor of logits: pass output_fn to pick "
            f"the logits, e.g. output_fn=lambda out: out[0] (or out.logits, out['logits'])")
    return out


def check_labels(y, classes, where):
    """Labels of one batch: integer class indices in [0, classes)."""
    if y.dim() > 1 or y.is_floating_point():
        shape = "one-hot or soft labels" if y.dim() > 1 else f"{y.dtype} labels"
        raise ConfigError(f"{where}: {shape} of shape {tuple(y.shape)}; labels must be integer class indices "
                          f"(for one-hot labels use y.argmax(-1))")
    if y.dtype == torch.bool or not y.numel():
        return
    low, high = int(y.min()), int(y.max())
    if low < 0 or high >= classes:
        bad = high if high >= classes else low
        raise ConfigError(f"{where}: label {bad} is outside the model's {classes} classes (0..{classes - 1}): "
                          "the data does not match the model's classifier")


def read_batches(batches, what):
    """Iterate `batches`, turning a failure to read or collate one into a ConfigError that names
    the batch (a CompressorError raised by the dataset, e.g. a corrupt image, passes as it is)."""
    it = iter(batches)
    i = 0
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except CompressorError:
            raise
        except Exception as e:  # a dataset or collate function can raise anything
            raise ConfigError(f"{what}: reading batch {i} failed: {explain(e)}") from e
        yield batch
        i += 1


def explain(e):
    """A read failure in words, with the fix for the common ones (mixed sizes, corrupt files)."""
    text = f"{type(e).__name__}: {e}"
    if "stack expects each tensor to be equal size" in str(e):
        return (f"images of different sizes ({e}); resize them to one size, e.g. "
                "transforms.Compose([transforms.Resize(s), transforms.CenterCrop(s), ...])")
    if isinstance(e, OSError) or "image file" in str(e):
        return f"{text} (a corrupt or unreadable file: remove or replace it)"
    return text
