"""The output folder of a compress() run. Every artifact is written into a staging folder inside
`out_dir` and moved into place together at the end (report.json last); artifacts of an earlier
run that this run does not produce are removed, so that no stale model.onnx stays beside a new
model.pt; the temporaries of a killed run are cleaned on the next start; the supernet checkpoints
are removed after success unless the caller keeps them."""
from __future__ import annotations

import contextlib
import fnmatch
import logging
import os
import shutil
import tempfile

from .files import remove_temporaries

log = logging.getLogger("compressor")
# Every file a run may write at the top of out_dir (the others are left alone: they are the user's).
ARTIFACTS = ("report.json", "model.pt", "supernet.pt", "pareto.png", "model.onnx", "model-*.onnx", "model-*.engine")
STAGING = ".staging-"
CHECKPOINTS = "checkpoints"
BUDGET_FOLDERS = "budget-"  # search_trained's folders, one per budget (trained.folder_name)


def _artifacts(folder):
    return sorted(f for f in os.listdir(folder) if any(fnmatch.fnmatchcase(f, p) for p in ARTIFACTS)
                  and os.path.isfile(os.path.join(folder, f)))


def prepare(out_dir):
    """Before a run: remove what a killed run left (staging folders, temporaries of atomic writes)
    and say which artifacts of an earlier run will be replaced."""
    for name in os.listdir(out_dir):
        if name.startswith(STAGING):
            shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)
            log.info("removed %s, left by an interrupted run", os.path.join(out_dir, name))
    for pattern in ARTIFACTS:
        remove_temporaries(out_dir, pattern)
    searched = sorted(n for n in os.listdir(out_dir) if n.startswith(BUDGET_FOLDERS)
                      and os.path.isdir(os.path.join(out_dir, n)))
    if searched:  # the user's results: kept, but they no longer match the supernet.pt beside them
        log.warning("%s holds models searched from an earlier run's supernet.pt (%s): this run replaces or removes "
                    "that file; they are left as they are", out_dir, ", ".join(searched))
    earlier = _artifacts(out_dir)
    if earlier:
        log.warning("%s holds the artifacts of an earlier run (%s): this run replaces them when it succeeds",
                    out_dir, ", ".join(earlier))


class Staging:
    """with Staging(out_dir) as stage: write to stage.path(name); on success every file of the
    staging folder replaces its namesake in out_dir and the earlier artifacts not produced again
    are removed; on an error the staging folder is removed and out_dir is left as it was."""

    def __init__(self, out_dir):
        self.out_dir = os.path.abspath(out_dir)
        self.folder = None

    def __enter__(self):
        self.folder = tempfile.mkdtemp(prefix=STAGING, dir=self.out_dir)
        return self

    def path(self, name):
        return os.path.join(self.folder, name)

    def final(self, staged):
        """Where a staged file will be once the run is committed."""
        return os.path.join(self.out_dir, os.path.relpath(staged, self.folder))

    def __exit__(self, kind, error, tb):
        try:
            if kind is None:
                self._commit()
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)

    def _commit(self):
        produced = sorted(f for f in os.listdir(self.folder) if not f.endswith(".tmp"))
        stale = [f for f in _artifacts(self.out_dir) if f not in produced]
        with contextlib.suppress(FileNotFoundError):  # first: a folder without a report is visibly incomplete
            os.remove(os.path.join(self.out_dir, "report.json"))
        for name in stale:
            os.remove(os.path.join(self.out_dir, name))
        if stale:
            log.info("removed %s of an earlier run from %s: this run does not produce them", ", ".join(stale),
                     self.out_dir)
        for name in sorted(produced, key=lambda f: f == "report.json"):  # the report last
            os.replace(os.path.join(self.folder, name), os.path.join(self.out_dir, name))


def finish_checkpoints(out_dir, keep):
    """After success: remove out_dir/checkpoints unless `keep`; returns the folder when kept."""
    folder = os.path.join(out_dir, CHECKPOINTS)
    if not os.path.isdir(folder):
        return None
    if keep:
        log.info("kept the supernet checkpoints in %s (keep_checkpoints=True)", folder)
        return folder
    size = sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(folder) for f in files)
    shutil.rmtree(folder)
    log.info("removed the supernet checkpoints (%.0f MB) from %s; keep_checkpoints=True keeps them", size / 1e6,
             out_dir)
    return None
