"""Run a serialized TensorRT 10 engine, with torch CUDA tensors or with pycuda alone.

This module is the deployment side. It needs only numpy at import time and imports nothing else
from this package, so the file can be copied to a box that has `tensorrt`, `pycuda` and numpy but
no torch (importing the `compressor` package itself pulls in torch). torch is used when it is
importable and sees a GPU (outputs stay on the GPU when the inputs are torch tensors); pycuda
otherwise.
"""

import contextlib
import dataclasses
import importlib
import importlib.util

import numpy as np

try:
    from compressor.errors import CompressorError

    _ERROR_BASES = (CompressorError, RuntimeError)
except ImportError:  # a copied single file, or the compressor package without its torch
    _ERROR_BASES = (RuntimeError,)

INSTALL_HINT = ("install it on a machine with an NVIDIA GPU and driver: "
                "pip install 'compressor[trt]' (TensorRT 10.x)")
SUPPORTED_TRT_MAJOR = 10


class TensorRTUnavailable(*_ERROR_BASES):
    """TensorRT, a CUDA binding or a GPU is missing, so engines cannot be built or run."""


def missing_requirements():
    """Why engines cannot be built or run here: a list such as ['tensorrt not installed'].

    Empty when TensorRT 10.x imports and a CUDA GPU is visible through torch or pycuda.
    """
    missing = []
    if importlib.util.find_spec("tensorrt") is None:
        missing.append("tensorrt not installed")
    else:
        trt = _import_or_none("tensorrt")
        if trt is None:
            missing.append("tensorrt installed but not importable (CUDA libraries missing?)")
        elif int(trt.__version__.split(".")[0]) != SUPPORTED_TRT_MAJOR:
            # TensorRT 11 removed the FP16/INT8 builder flags and the int8 calibrators used here.
            missing.append(f"tensorrt {trt.__version__} found, 10.x required")
    if not _gpu_visible():
        missing.append("no CUDA GPU")
    return missing


def require_tensorrt():
    """Import and return `tensorrt`, or raise TensorRTUnavailable saying what is missing."""
    missing = missing_requirements()
    if missing:
        raise TensorRTUnavailable(f"TensorRT engines need TensorRT 10.x and a CUDA GPU, but here: "
                                  f"{'; '.join(missing)}. To fix, {INSTALL_HINT}")
    import tensorrt as trt

    return trt


def _import_or_none(name):
    # OSError too: CUDA packages raise it when their shared libraries or the driver are missing.
    try:
        return importlib.import_module(name)
    except (ImportError, OSError):
        return None


def _gpu_visible():
    torch = _import_or_none("torch")
    if torch is not None and torch.cuda.is_available():
        return True
    cuda = _import_or_none("pycuda.driver")
    if cuda is None:
        return False
    try:
        cuda.init()
        return cuda.Device.count() > 0
    except cuda.Error:
        return False


def cuda_backend(device=0):
    """The CUDA memory backend: torch when it sees a GPU, else pycuda."""
    torch = _import_or_none("torch")
    if torch is not None and torch.cuda.is_available():
        return _TorchCuda(device)
    if _import_or_none("pycuda.driver") is not None:
        return _PyCuda(device)
    raise TensorRTUnavailable(f"no CUDA GPU visible to torch, and pycuda is not usable; "
                              f"{INSTALL_HINT}")


class _TorchCuda:
    """Device buffers are torch tensors. Engines run on a side stream (TensorRT syncs extra on
    the default stream) that is ordered after, and before, the work on torch's current stream."""

    def __init__(self, device):
        import torch

        self.torch = torch
        self.device = torch.device("cuda", device)
        self.stream = torch.cuda.Stream(self.device)

    def active(self):
        return self.torch.cuda.device(self.device)

    def execute(self, context):
        current = self.torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        ok = context.execute_async_v3(self.stream.cuda_stream)
        current.wait_stream(self.stream)
        return ok

    def synchronize(self):
        self.torch.cuda.synchronize(self.device)

    def torch_dtype(self, dtype):
        return self.torch.from_numpy(np.empty(0, dtype)).dtype

    def empty(self, shape, dtype):
        return self.torch.empty(tuple(shape), dtype=self.torch_dtype(dtype), device=self.device)

    def copy_in(self, buffer, array):
        buffer.copy_(self.torch.from_numpy(np.ascontiguousarray(array)))

    @staticmethod
    def ptr(buffer):
        return buffer.data_ptr()

    @staticmethod
    def to_host(buffer):
        return buffer.cpu().numpy()


@dataclasses.dataclass
class _PyCudaArray:
    allocation: object
    shape: tuple
    dtype: np.dtype


class _PyCuda:
    """Device buffers are pycuda allocations in the device's primary context (the one TensorRT
    and the CUDA runtime use); the context is pushed only around each operation, so any thread
    can use the runner."""

    def __init__(self, device):
        import pycuda.driver as cuda

        self.cuda = cuda
        cuda.init()
        if cuda.Device.count() <= device:
            raise TensorRTUnavailable(f"no CUDA GPU with index {device}; {INSTALL_HINT}")
        self.context = cuda.Device(device).retain_primary_context()
        with self.active():
            self.stream = cuda.Stream()

    @contextlib.contextmanager
    def active(self):
        self.context.push()
        try:
            yield
        finally:
            self.cuda.Context.pop()

    def execute(self, context):
        return context.execute_async_v3(self.stream.handle)

    def synchronize(self):
        self.stream.synchronize()

    def empty(self, shape, dtype):
        dtype = np.dtype(dtype)
        nbytes = max(1, int(np.prod(shape)) * dtype.itemsize)
        return _PyCudaArray(self.cuda.mem_alloc(nbytes), tuple(shape), dtype)

    def copy_in(self, buffer, array):
        self.cuda.memcpy_htod(buffer.allocation, np.ascontiguousarray(array, dtype=buffer.dtype))

    @staticmethod
    def ptr(buffer):
        return int(buffer.allocation)

    def to_host(self, buffer):
        out = np.empty(buffer.shape, buffer.dtype)
        self.cuda.memcpy_dtoh(out, buffer.allocation)
        return out


class EngineRunner:
    """Load a serialized engine once and run batches through it.

    `runner(x)` takes one array per engine input (numpy arrays, or torch tensors with the torch
    backend) and returns the list of outputs in engine order: numpy arrays for numpy inputs,
    CUDA torch tensors for torch inputs. The batch must lie in the engine's profile range
    (`batch_range`).
    """

    def __init__(self, engine_path, *, device=0):
        trt = require_tensorrt()
        self._trt = trt
        self._cuda = cuda_backend(device)
        # The logger and runtime must outlive the engine deserialized from them.
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        with self._cuda.active():
            with open(engine_path, "rb") as f:
                self.engine = self._runtime.deserialize_cuda_engine(f.read())
            if self.engine is None:
                raise RuntimeError(f"could not deserialize {engine_path!r}: engines only load with "
                                   f"the TensorRT version and GPU model that built them")
            self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.input_names = [n for n in names if is_input[n]]
        self.output_names = [n for n in names if not is_input[n]]

    @property
    def batch_range(self):
        """(min, max) batch of the first input in optimization profile 0."""
        low, _, high = self.engine.get_tensor_profile_shape(self.input_names[0], 0)
        return low[0], high[0]

    def __call__(self, *inputs):
        if len(inputs) != len(self.input_names):
            raise ValueError(f"engine takes {len(self.input_names)} inputs "
                             f"{self.input_names}, got {len(inputs)}")
        as_torch = not isinstance(inputs[0], np.ndarray)
        if as_torch and not isinstance(self._cuda, _TorchCuda):
            raise TypeError("torch tensors need the torch backend; pass numpy arrays with pycuda")
        with self._cuda.active():
            # Device inputs stay referenced until the engine has run.
            device_inputs = [self._bind_input(n, x) for n, x in zip(self.input_names, inputs)]
            outputs = []
            for name in self.output_names:
                dtype = self._trt.nptype(self.engine.get_tensor_dtype(name))
                out = self._cuda.empty(tuple(self.context.get_tensor_shape(name)), dtype)
                self.context.set_tensor_address(name, self._cuda.ptr(out))
                outputs.append(out)
            if not self._cuda.execute(self.context):
                raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log)")
            if as_torch:
                return outputs  # torch's current stream waits for the engine: no host sync
            self._cuda.synchronize()
            del device_inputs  # only now may they be freed: the engine has finished with them
            return [self._cuda.to_host(o) for o in outputs]

    def _bind_input(self, name, x):
        dtype = self._trt.nptype(self.engine.get_tensor_dtype(name))
        if not self.context.set_input_shape(name, tuple(x.shape)):
            low, high = self.batch_range
            raise ValueError(f"input {name!r} shape {tuple(x.shape)} is outside the engine's "
                             f"profile (batch {low}..{high})")
        if isinstance(x, np.ndarray):
            buffer = self._cuda.empty(x.shape, dtype)
            self._cuda.copy_in(buffer, x.astype(dtype, copy=False))
        else:
            buffer = x.to(self._cuda.device, self._cuda.torch_dtype(dtype)).contiguous()
        self.context.set_tensor_address(name, self._cuda.ptr(buffer))
        return buffer
