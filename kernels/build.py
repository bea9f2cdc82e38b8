"""Compile and load the masked-convolution CUDA extension (JIT, cached on disk).

`python -m compressor.kernels.build` compiles it and exits non-zero on failure; CI uses that as a
compile check on machines without a GPU. `build_emulated()` compiles the same kernels for the CPU
emulator (csrc/masked_conv_emulated.cpp), which the tests run against the reference convolution.
"""
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from compressor.errors import CompressorError

NAME = "compressor_masked_conv"
CSRC = Path(__file__).parent / "csrc"
SOURCES = [CSRC / "masked_conv.cpp", CSRC / "masked_conv_cuda.cu"]
EMULATED_SOURCES = [CSRC / "masked_conv.cpp", CSRC / "masked_conv_emulated.cpp"]
DEFAULT_ARCH = "9.0"  # Hopper (H100/H200): the target when no GPU is visible to autodetect

log = logging.getLogger("compressor.kernels")


class BuildError(CompressorError, RuntimeError):
    """The extension cannot be built here; the message says what is missing."""


def cuda_home():
    """The CUDA toolkit root: CUDA_HOME/CUDA_PATH if set, else found from nvcc on PATH.

    torch guesses dirname(dirname(which nvcc)), which is wrong when nvcc on PATH is a wrapper
    script (e.g. /usr/local/bin/nvcc): accept a root only if it has the headers too.
    """
    explicit = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if explicit:
        if not (Path(explicit) / "bin" / "nvcc").exists():
            raise BuildError(f"CUDA_HOME={explicit} has no bin/nvcc: point it at a CUDA toolkit")
        return explicit
    candidates = ["/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.insert(0, str(Path(nvcc).resolve().parent.parent))
    for root in candidates:
        if (Path(root) / "bin" / "nvcc").exists() and (Path(root) / "include" / "cuda_runtime.h").exists():
            return root
    raise BuildError("nvcc not found: install the CUDA toolkit, or set CUDA_HOME to its root")


def _arch_list():
    """Set TORCH_CUDA_ARCH_LIST when no GPU can be autodetected, and return the list in use."""
    if "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH
    if "TORCH_CUDA_ARCH_LIST" in os.environ:
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    return ";".join(f"{major}.{minor}" for major, minor in caps)


def build_directory(target):
    """Per torch/CUDA/target cache directory, so builds for different setups never overwrite each other."""
    base = os.environ.get("TORCH_EXTENSIONS_DIR") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "compressor" / "kernels"
    tag = f"torch{torch.__version__}-cuda{torch.version.cuda}-{target}"
    tag = "".join(ch if ch.isalnum() or ch in ".-" else "_" for ch in tag)
    path = Path(base) / tag
    path.mkdir(parents=True, exist_ok=True)
    return path


def build(verbose=False):
    """Compile (first call) or load (cached) the extension and return the module.

    Raises BuildError saying what is missing (CUDA build of torch, nvcc, ninja) and re-raises
    compiler errors as BuildError.
    """
    if torch.version.cuda is None:
        raise BuildError(f"torch {torch.__version__} is a CPU-only build: the kernel needs a CUDA build of torch")
    home = cuda_home()
    from torch.utils import cpp_extension

    # torch reads its CUDA root once, at import, with the guess that cuda_home() corrects.
    cpp_extension.CUDA_HOME = home
    arch_list = _arch_list()
    return _load(NAME, SOURCES, build_directory(f"sm{arch_list}"), verbose, extra_cuda_cflags=["-O3"])


def build_emulated(verbose=False):
    """Compile (first call) or load the CPU emulator of the CUDA kernels: the same kernel source run
    with one host thread per CUDA thread, on CPU tensors. For tests; it is slow by design."""
    return _load(NAME + "_emulated", EMULATED_SOURCES, build_directory("emulated"), verbose,
                 extra_cflags=["-DMASKED_CONV_EMULATED"], extra_ldflags=["-pthread"])


def _load(name, sources, directory, verbose, extra_cflags=(), **options):
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        raise BuildError("ninja not found: pip install ninja")
    log.info("building %s in %s", name, directory)
    try:
        return cpp_extension.load(name=name, sources=[str(s) for s in sources], extra_cflags=["-O3", *extra_cflags],
                                  build_directory=str(directory), verbose=verbose, **options)
    except (RuntimeError, OSError, ImportError) as error:
        raise BuildError(f"building {name} in {directory} failed: {error}") from error


def main():
    start = time.perf_counter()
    try:
        module = build(verbose=True)
    except BuildError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"built {module.__file__} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
