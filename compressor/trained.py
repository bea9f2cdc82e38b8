"""A trained supernet kept for later searches (METHOD section 6: one supernet serves any number of
budgets). compress() with a supernet method and an out_dir writes out_dir/supernet.pt: the trained
weights (and those before training), the training records, the width space's description, the
config, the latency measurements and the run's identity, all plain data that torch.load reads with
weights_only=True. api.search_trained() reads it back and refuses it for another model, other
data or other training options."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re

import torch

from ._version import __version__
from .config import CompressConfig
from .errors import ConfigError
from .files import write_text_atomic
from .outputs import BUDGET_FOLDERS
from .run_identity import check_same_run, plain, run_identity

log = logging.getLogger("compressor")
FILE = "supernet.pt"
FORMAT = 1
KEYS = ("format", "method", "config", "identity", "space", "supernet", "records")
# options that act after supernet training: a later search may change them; every other option
# defines the trained supernet (or the width space it lives in) and must stay what it was
SEARCH_OPTIONS = ("effort", "finetune_epochs", "finetune_lr", "export", "calib_batches", "final_batches",
                  "score_metric", "inherit", "score_original", "seed_population", "reparam", "reparam_options")
FIX = ("Pass the model, train_data and options of the compress() run that wrote it (CLI: its --model, --weights, "
       "--data and --image-size), or run compress() again.")


def space_description(space) -> dict:
    """What a width space is, as data: a recomputed space must equal it for the weights to fit."""
    return {"groups": [[g.name, int(g.size)] for g in space.groups], "frozen": sorted(space.frozen),
            "bins": space.bins, "divisor": plain(space.divisor), "min_bins": space.min_bins.tolist(),
            "max_bins": space.max_bins.tolist(), "flops": int(space.flops(space.max())),
            "example_shape": list(space.example_input.shape),
            # only when not the default: a supernet.pt written before the option still matches
            **({"binning": space.binning} if space.binning != "channels" else {})}


def latency_caches(space) -> dict:
    """{runtime: {"file", "data"}}: the on-disk latency cache of each latency model built for
    `space` (the measurements a later search on that target reuses instead of timing again)."""
    caches = {}
    for name, model in space.latency_models.items():
        path = model.info.get("cache")
        if path and os.path.isfile(path):
            with open(path) as f:
                caches[name] = {"file": os.path.basename(path), "data": json.load(f)}
    return caches


def restore_latency_caches(saved: dict, latency_options: dict | None):
    """Put the saved latency measurements back into the latency cache folder where it lacks them,
    so that build_latency_model finds them (a cache of another device or version is not used:
    its key differs)."""
    options = latency_options or {}
    if options.get("cache_dir") is False or options.get("measurements") is not None:
        return
    from .latency import default_cache_dir
    folder = options.get("cache_dir") or default_cache_dir()
    for entry in saved.get("latency", {}).values():
        path = os.path.join(folder, entry["file"])
        if not os.path.exists(path):
            write_text_atomic(path, json.dumps(entry["data"]), make_folder=True)
            log.info("restored the latency measurements of the trained run into %s", path)


def bundle(*, method, method_options, cfg: CompressConfig, identity, space, budget, window, kept) -> dict:
    """supernet.pt's content. `kept`: what _fit_supernet kept of the training (weights, records,
    steps, anchors)."""
    fields = dataclasses.asdict(cfg)
    return {"format": FORMAT, "compressor_version": __version__, "method": method,
            "method_options": plain(method_options),
            "config": plain(fields),
            # fields whose value is not plain data (e.g. module types in exclude) must be passed again
            # module types in exclude are not data: a later search must be given them again
            "config_not_stored": ["exclude"] if any(not isinstance(e, str) for e in cfg.exclude) else [],
            "identity": identity, "space": space_description(space), "latency": latency_caches(space),
            "budget": str(budget), "window": window, **kept}


def identity(model, train_data) -> dict:
    """The user's model (architecture and weights) and training data, hashed as checkpoints do."""
    return run_identity(model, train_data)


def load(out_dir, device="cpu") -> dict:
    """out_dir/supernet.pt as data, or a ConfigError saying why there is none and what to run."""
    path = os.path.join(out_dir, FILE)
    if not os.path.isdir(out_dir):
        from .methods import METHODS  # the registry imports the search: only when refusing
        supernet_methods = [name for name in METHODS if METHODS.get(name).fit is None]
        raise ConfigError(f"{out_dir} is not a folder: give the out_dir of a compress() run with a supernet "
                          f"method ({', '.join(map(repr, supernet_methods))})")
    if not os.path.isfile(path):
        method = _reported_method(out_dir)
        why = (f"its run used method {method!r}, which trains no supernet" if method else
               "no compress() run with a supernet method wrote it")
        raise ConfigError(f"{out_dir} holds no trained supernet ({FILE}): {why}. Run compress(..., method='bcnet' "
                          f"(or 'ua'), out_dir={out_dir!r}) once (CLI: compressor compress --method bcnet --out "
                          f"{out_dir}); then search_trained() searches it for any budget")
    try:
        saved = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # truncated, corrupt, or not a torch file
        raise ConfigError(f"{path} is not readable ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}): "
                          f"run compress() again to write it") from e
    if not isinstance(saved, dict) or not set(KEYS) <= saved.keys() or saved["format"] != FORMAT:
        raise ConfigError(f"{path} is not a trained supernet of this compressor version ({__version__}): run "
                          f"compress() again to write it")
    return saved


def _reported_method(out_dir):
    try:
        with open(os.path.join(out_dir, "report.json")) as f:
            return json.load(f).get("method")
    except (OSError, ValueError, AttributeError):
        return None


def config(saved: dict, path: str, options: dict) -> CompressConfig:
    """The trained run's config with `options` applied: SEARCH_OPTIONS may change, the others must
    equal the trained run's (ConfigError naming each that differs)."""
    stored = {k: v for k, v in saved["config"].items() if k not in saved.get("config_not_stored", ())}
    missing = [k for k in saved.get("config_not_stored", ()) if k not in options]
    if missing:
        raise ConfigError(f"{path} was trained with {', '.join(missing)} that is not stored as data (module types): "
                          f"pass {', '.join(f'{k}=...' for k in missing)} as the compress() run did")
    known = {f.name for f in dataclasses.fields(CompressConfig)}
    base = CompressConfig.build(**{k: v for k, v in stored.items() if k in known and k != "export"},
                                export=tuple(stored.get("export") or ()))
    cfg = CompressConfig.build(base, **options)
    changed = [k for k in options if k not in SEARCH_OPTIONS and k in saved["config"]
               and plain(getattr(cfg, k)) != saved["config"][k]]
    if changed:
        raise ConfigError(f"{path} was trained with " + ", ".join(f"{k}={saved['config'][k]!r}" for k in changed)
                          + f", not {', '.join(f'{k}={options[k]!r}' for k in changed)}: these options define the "
                          f"trained supernet. A later search may change only {', '.join(SEARCH_OPTIONS)}; for other "
                          f"values run compress() again")
    if cfg.inherit != "supernet" and saved.get("before") is None:
        raise ConfigError(f"inherit={cfg.inherit!r} needs the weights before supernet training, which the run that "
                          f"wrote {path} did not keep (it used inherit='supernet'): search with inherit='supernet'")
    return cfg


def check_identity(saved: dict, model, train_data, path: str):
    """ConfigError naming what differs when `model` or `train_data` are not the trained run's."""
    check_same_run(saved["identity"], identity(model, train_data), path, FIX, what="the supernet of another run")


def check_space(saved: dict, space, path: str):
    now = space_description(space)
    if now != saved["space"]:
        differ = [k for k in now if now[k] != saved["space"].get(k)]
        raise ConfigError(f"{path} was trained on another width space ({', '.join(differ)} differ; e.g. another "
                          f"example input size): pass the example_input of the compress() run that wrote it "
                          f"(CLI: its --image-size)")


def with_target(budget: str, target: str | None) -> str:
    """'latency<=2ms' with target 'ort-cpu' -> 'latency<=2ms@ort-cpu' (a latency bound that names no
    target gets `target`)."""
    if target is None:
        return budget
    parts = [p.strip() for p in str(budget).split(",")]
    return ",".join(p + f"@{target}" if p.lower().startswith("latency") and "@" not in p else p for p in parts)


def folder_name(budget) -> str:
    """budget-<the budget as a file name>: 'flops<=50%,latency<=2ms@ort-cpu' ->
    'budget-flops50pct_latency2ms-ort-cpu'."""
    text = str(budget).replace("<=", "").replace("%", "pct").replace("@", "-").replace(",", "_")
    return BUDGET_FOLDERS + re.sub(r"[^A-Za-z0-9._-]", "-", text)
