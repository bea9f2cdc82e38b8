"""Writing files so that a crash or an error never leaves a half-written file under the final
name: write a temporary file in the same folder, fsync it, then rename it over the target."""
import contextlib
import os
import secrets
import shutil
import tempfile

from .errors import ConfigError


def check_output_folder(folder):
    """Raise a clear error unless `folder` exists, is a directory and is writable."""
    if not os.path.exists(folder):
        raise FileNotFoundError(f"output folder {folder!r} does not exist; create it first")
    if not os.path.isdir(folder):
        raise NotADirectoryError(f"output folder {folder!r} is not a directory")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"output folder {folder!r} is not writable")


def check_writable(folder, needed_bytes):
    """Create `folder` if needed; raise ConfigError unless a file can be written there and it has
    `needed_bytes` free."""
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise ConfigError(f"cannot write checkpoints to {folder!r}: {e}. Pass a writable folder.") from e
    free = shutil.disk_usage(folder).free
    if free < needed_bytes:
        raise ConfigError(f"{folder!r} has {free / 1e6:.0f} MB free but a checkpoint needs about "
                          f"{needed_bytes / 1e6:.0f} MB: free some space or choose another folder")


@contextlib.contextmanager
def atomic_output(path, make_folder=False):
    """Yield a temporary path next to `path`; it replaces `path` only if the block succeeds.

    The temp file sits in the same folder so that `os.replace` is an atomic rename. On any error
    it is removed and an existing file at `path` is left as it was.
    """
    path = os.path.abspath(os.fspath(path))
    folder, name = os.path.split(path)
    if make_folder:
        os.makedirs(folder, exist_ok=True)
    check_output_folder(folder)
    tmp = os.path.join(folder, f".{name}.{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def write_bytes_atomic(path, data):
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def write_text_atomic(path, text, make_folder=False):
    with atomic_output(path, make_folder) as tmp, open(tmp, "w") as f:
        f.write(text)


def atomic_torch_save(obj, path):
    """torch.save, atomically; the folder is created if needed."""
    import torch
    with atomic_output(path, make_folder=True) as tmp:
        torch.save(obj, tmp)


def read_bytes_or_none(path):
    """The content of `path`, or None when the file is missing or empty."""
    try:
        with open(os.fspath(path), "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    return data or None


def remove_temporaries(folder, name):
    """Remove the temporary files atomic_output left for `name` (a file name or a glob pattern) in
    `folder` when a run was killed in the middle of a write; returns their paths."""
    import glob
    stale = glob.glob(os.path.join(glob.escape(os.fspath(folder)), f".{name}.*.tmp"))
    for path in stale:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
    return stale


def without_nan(value):
    """`value` (dicts, lists, tuples, numbers) for JSON, which has no NaN: NaN (an unscored value, e.g.
    a UA run's right side) becomes null."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: without_nan(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [without_nan(v) for v in value]
    return value
