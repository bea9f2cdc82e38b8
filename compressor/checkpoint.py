"""Resuming a killed run: where its checkpoint is, whether the checkpoint there belongs to this run,
and the random state that makes the resumed run draw what the uninterrupted one would have.
Checkpoints are written with files.atomic_torch_save and loaded as data (weights_only=True);
supernet training and DAGGER's gate training resume through here."""
from __future__ import annotations

import logging
import os
import random

import numpy as np
import torch

from .errors import ConfigError
from .files import check_writable, remove_temporaries
from .run_identity import check_same_run

log = logging.getLogger("compressor.checkpoint")

RESUME_FIX = ("Use another folder (compress: out_dir; train_supernet: checkpoint_dir), or pass restart=True "
              "(CLI: --restart) to discard the checkpoint and start over.")


def rng_state() -> dict:
    """The process's random state (torch, Python, numpy, CUDA) as checkpoint data."""
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [v.tolist() if isinstance(v, np.ndarray) else v for v in np.random.get_state()],
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(tuple(v) if isinstance(v, list) else v for v in state["python"]))
    np.random.set_state(tuple(np.array(v, dtype=np.uint32) if isinstance(v, list) else v for v in state["numpy"]))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(path, device, keys, what) -> dict:
    """The checkpoint at `path` (a dict holding `keys`), or a ConfigError saying it is unreadable or
    not `what` (e.g. "a supernet checkpoint written by train_supernet")."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # truncated, corrupt, or not a torch file
        raise ConfigError(f"{path} is not a readable checkpoint ({type(e).__name__}: "
                          f"{(str(e).splitlines() or [''])[0][:200]}). " + RESUME_FIX) from e
    if not isinstance(state, dict) or not set(keys) <= state.keys():
        raise ConfigError(f"{path} is not {what}. " + RESUME_FIX)
    return state


def resume(folder, name, run, *, size, keys, what, restart=False, device="cpu", owner=True):
    """(path, state) for the checkpoint `name` in `folder` of the run whose identity is `run`
    (run_identity.run_identity): `folder` is created and checked to hold `size` bytes, the
    temporaries of an interrupted write are removed, and `state` is the checkpoint this same run
    saved there, or None to start afresh (none yet, or `restart`, which deletes it). A checkpoint
    of another run raises ConfigError naming what differs. `owner`: this process removes files
    (False on the other ranks of a distributed run)."""
    check_writable(folder, size)
    path = os.path.join(folder, name)
    if owner and remove_temporaries(folder, name):
        log.info("removed the temporary files of an interrupted checkpoint write in %s", folder)
    if restart:
        if owner and os.path.exists(path):
            os.remove(path)
            log.info("restart: removed the checkpoint %s", path)
        return path, None
    if not os.path.exists(path):
        return path, None
    state = load_checkpoint(path, device, keys, what)
    check_same_run(state.get("run") or {}, run, path, RESUME_FIX)
    return path, state
