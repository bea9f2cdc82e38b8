"""Export a model to one verified ONNX file.

`export_onnx` uses the torch.export-based ("dynamo") exporter, the default and recommended one
in torch >= 2.9: the TorchScript exporter cannot express `adaptive_avg_pool2d` when the output
size does not divide the input size (vgg at 64x64, for example), while the dynamo exporter handles
every torchvision CNN we test, flatten -> linear heads included, with a symbolic batch dimension.

A file only lands at `path` after it passed `onnx.checker`, strict shape inference and an
ONNX Runtime parity check against torch; until then it lives in a temporary file in the same
folder, which is removed on any error.
"""

import copy
import dataclasses
import os
import warnings

import numpy as np
import onnx
import onnxruntime
import torch

from compressor._version import __version__
from compressor.errors import CompressorError
from compressor.files import atomic_output, check_output_folder

from .transforms import before_export

VERSION_KEY = "compressor_version"
INPUT_NAME = "input"
# Parity tolerance of the exported fp32 graph: max|y_ort - y_torch| <= PARITY_RTOL * max|y_torch|.
PARITY_RTOL = 1e-4
# Protobuf cannot serialize a single message of 2 GiB or more; larger models would need an
# external-data side file, which this exporter deliberately does not produce.
_MAX_SINGLE_FILE_BYTES = 2**31 - 1
_SECOND_BATCH_SEED = 0


class ExportError(CompressorError, RuntimeError):
    """An export or engine build failed, or its result is invalid or differs from its reference."""


@dataclasses.dataclass(frozen=True)
class ExportReport:
    """What `export_onnx` wrote and how closely ONNX Runtime matched torch.

    `max_abs_diff` maps each batch size checked to max|y_ort - y_torch| over all outputs.
    """

    path: str
    opset: int
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    dynamic_batch: bool
    max_abs_diff: dict[int, float]


def export_onnx(model, example_input, path, *, dynamic_batch=True, opset=None, metadata=None):
    """Export `model` (run in eval mode on CPU) to a single ONNX file at `path`.

    The caller's model is not touched: a deep copy is exported, after the passes of transforms.py
    (RepNAS branch blocks fused into their conv and BN). `metadata` (str -> str) is stored
    in the file's `metadata_props` next to the compressor version. With `dynamic_batch` the batch
    dimension is symbolic and parity is checked at the example batch and at a second batch size
    (1, or 3 when the example batch is 1). Returns an `ExportReport`; raises `ExportError` when
    the exporter fails, the graph is invalid or outputs differ from torch by more than
    `PARITY_RTOL * max|y_torch|`.
    """
    _check_model_and_input(model, example_input)
    _check_single_file_size(model)
    props = _metadata_props(metadata)
    path = os.path.abspath(os.fspath(path))
    check_output_folder(os.path.dirname(path))  # fail before the slow export, not after it

    model = before_export(_eval_cpu_copy(model))  # e.g. RepNAS branches fused: the inference graph
    x = example_input.detach().cpu()
    with torch.no_grad():
        y = _output_list(model(x))
    output_names = ("output",) if len(y) == 1 else tuple(f"output_{i}" for i in range(len(y)))

    proto = _torch_to_onnx(model, x, output_names, dynamic_batch, opset)
    if dynamic_batch:
        _check_batch_is_symbolic(proto)
    for key, value in props.items():
        proto.metadata_props.add(key=key, value=value)
    try:
        onnx.checker.check_model(proto)
        onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True,
                                          data_prop=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ExportError(f"the exported graph is not valid ONNX: {e}") from e

    checks = {x.shape[0]: (x, y)}
    if dynamic_batch:
        x2 = _second_batch(x)
        with torch.no_grad():
            checks[x2.shape[0]] = (x2, _output_list(model(x2)))

    with atomic_output(path) as tmp:
        onnx.save_model(proto, tmp, save_as_external_data=False)
        session = onnxruntime_session(tmp)
        diffs = {b: _parity(session, xb, yb, b) for b, (xb, yb) in checks.items()}

    return ExportReport(
        path=path,
        opset=next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
        input_names=(INPUT_NAME,),
        output_names=output_names,
        dynamic_batch=dynamic_batch,
        max_abs_diff=diffs,
    )


def load_onnx_metadata(path):
    """Return the `metadata_props` of an ONNX file as a dict (str -> str)."""
    proto = onnx.load(os.fspath(path), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}


def onnxruntime_session(path):
    """An ONNX Runtime CPU session for `path` (the reference runtime of this package)."""
    return onnxruntime.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])


def run_onnxruntime(session, array):
    """Run a single-input session on one batch; returns the list of output arrays."""
    feed = {session.get_inputs()[0].name: np.ascontiguousarray(array)}
    return session.run(None, feed)


def _check_model_and_input(model, example_input):
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(example_input, torch.Tensor):
        raise TypeError(
            f"example_input must be a torch.Tensor batch such as torch.randn(1, 3, 224, 224), "
            f"got {type(example_input).__name__}"
        )
    if example_input.dim() < 1 or example_input.shape[0] < 1:
        raise ValueError(f"example_input needs a batch dimension of size >= 1, got shape "
                         f"{tuple(example_input.shape)}")
    if not example_input.is_floating_point():
        raise TypeError(f"example_input must be a floating-point tensor, got {example_input.dtype}")


def _check_single_file_size(model):
    size = sum(t.numel() * t.element_size()
               for t in (*model.parameters(), *model.buffers()))
    if size > _MAX_SINGLE_FILE_BYTES:
        raise ExportError(f"model weights take {size / 2**30:.1f} GiB; a single ONNX file is "
                          f"limited to 2 GiB")


def _metadata_props(metadata):
    props = {VERSION_KEY: __version__}
    for key, value in (metadata or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"metadata keys and values must be str (encode structures as JSON), "
                            f"got {key!r}: {type(value).__name__}")
        if key == VERSION_KEY:
            raise ValueError(f"metadata key {VERSION_KEY!r} is reserved for the compressor version")
        props[key] = value
    return props


def _eval_cpu_copy(model):
    try:
        clone = copy.deepcopy(model)
    except Exception as e:
        raise ExportError(f"could not deep-copy the model ({e}); export works on a copy so that "
                          f"the caller's model is never modified") from e
    return clone.eval().cpu()


def _output_list(y):
    outputs = [y] if isinstance(y, torch.Tensor) else y
    if not isinstance(outputs, (list, tuple)) or not all(
            isinstance(t, torch.Tensor) for t in outputs):
        raise ExportError(f"model output must be a tensor or a tuple/list of tensors, got "
                          f"{type(y).__name__}")
    return [t.detach().cpu() for t in outputs]


def _torch_to_onnx(model, x, output_names, dynamic_batch, opset):
    dynamic_shapes = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
    try:
        with warnings.catch_warnings():
            # Raised inside torch.export itself; nothing a user of this function can act on.
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)",
                                    category=FutureWarning)
            program = torch.onnx.export(
                model, (x,), dynamo=True, input_names=[INPUT_NAME],
                output_names=list(output_names), dynamic_shapes=dynamic_shapes,
                opset_version=opset, verbose=False)
    except Exception as e:
        raise ExportError(f"torch.onnx.export failed for {type(model).__name__}: {e}") from e
    return program.model_proto


def _check_batch_is_symbolic(proto):
    # torch.export can silently specialize the batch to the example's (x.view(2, -1) and such):
    # catch it here with the likely cause instead of as a shape error at the second batch.
    dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    if not dim.dim_param:
        raise ExportError(
            f"the exported batch dimension is fixed to {dim.dim_value}: the model ties its "
            f"computation to the example batch size (e.g. x.view({dim.dim_value}, -1)); use "
            f"torch.flatten(x, 1) / x.view(x.size(0), -1), or export with dynamic_batch=False")


def _second_batch(x):
    batch = 1 if x.shape[0] != 1 else 3
    g = torch.Generator().manual_seed(_SECOND_BATCH_SEED)
    return torch.randn((batch, *x.shape[1:]), generator=g, dtype=x.dtype)


def _parity(session, x, y_torch, batch):
    y_ort = run_onnxruntime(session, x.numpy())
    if len(y_ort) != len(y_torch):
        raise ExportError(f"ONNX Runtime returned {len(y_ort)} outputs, torch {len(y_torch)}")
    worst = 0.0
    for i, (a, b) in enumerate(zip(y_torch, y_ort)):
        a = a.numpy()
        if a.shape != b.shape:
            raise ExportError(f"output {i} at batch {batch}: ONNX Runtime shape {b.shape} != "
                              f"torch shape {a.shape}")
        diff = float(np.max(np.abs(a - b), initial=0.0))
        tol = PARITY_RTOL * float(np.max(np.abs(a), initial=0.0))
        if not diff <= tol:  # also catches NaN
            raise ExportError(f"output {i} at batch {batch}: ONNX Runtime differs from torch by "
                              f"max abs {diff:.3g} > tolerance {tol:.3g} "
                              f"({PARITY_RTOL:g} * max|y_torch|)")
        worst = max(worst, diff)
    return worst
