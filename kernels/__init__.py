"""Masked convolution: compute only the active channel windows (see masked_conv.py).

The CUDA extension is built by compressor.kernels.build (on first use, or ahead of time with
`python -m compressor.kernels.build`).
"""
from .masked_conv import IMPLS, masked_conv2d

__all__ = ["IMPLS", "masked_conv2d"]
