"""Width-search methods as plug-ins: each module registers one Method (see base.py); compress(),
train_supernet(), the CLI and the benchmarks look methods up here by name."""
from .base import METHODS, FitContext, Fitted, Method, NoOptions, get_method, register
from . import bcnet, bsnas, cafenet, dagger, mctnas, recon, swp, ua  # noqa: F401,E402  (registration)

__all__ = ["METHODS", "FitContext", "Fitted", "Method", "NoOptions", "get_method", "register"]
