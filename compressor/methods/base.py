"""What a width-search method is: a small descriptor that the trainer, the search and compress()
read instead of comparing method names.

A supernet method gives a sampler (which subnets a step trains, with their loss weights), a
per-subnet loss, which records feed the prior, the sides the search scores and the searcher.
A method that is not a supernet (DAGGER) sets `fit` instead and replaces compress()'s whole fit
step (supernet, training, search, slimming)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import ConfigError
from ..registry import Registry
from ..search import search

METHODS = Registry("method")


@dataclass(frozen=True)
class NoOptions:
    """For a method without options."""


def default_loss(i, out, base, state):
    """The subnet's own loss: `base()` is its cross-entropy, distilled from the teacher when there
    is one (a callable, so a method that does not use it does not compute it)."""
    return base()


def record_all(cfg, space):
    return True


@dataclass(frozen=True)
class Method:
    name: str
    # sampler(space, seed, options, window=None, sides=None) -> .next(), .state_dict(), ...; window:
    # a samplers.TrainingWindow its random configurations must come from (None: the whole space);
    # sides: the sides a step trains (None: the method's own choice)
    sampler: Callable[..., Any]
    options: type = NoOptions            # a frozen dataclass of the method's knobs, with defaults
    # loss(i, out, base, state): the loss of the i-th subnet of a step from its logits `out`; `base()`
    # is the default loss; `state` is a dict that lives for one step (e.g. the largest subnet's output)
    loss: Callable[..., Any] = default_loss
    # forward(net, options) -> run(model, x, i, state): how a training step runs its i-th subnet (None:
    # model(x)); built once per run on the supernet `net` (swp: stages fed the full network's stage outputs)
    forward: Callable[..., Any] | None = None
    record: Callable[..., bool] = record_all   # record(cfg, space): does this subnet feed the prior?
    sides: tuple = ("left", "right")    # the sides the search scores and may deliver
    searcher: Callable[..., Any] = search
    # searcher_kwargs(options, sampler) -> dict: more keyword arguments for `searcher`, from the method's
    # options and the trained sampler (mctnas: the tree search's settings and the training tree)
    searcher_kwargs: Callable[..., dict] = lambda options, sampler: {}
    # fit(FitContext) -> Fitted: replaces supernet training and search (None: a supernet method)
    fit: Callable[..., Any] | None = None
    # min-min (CafeNet): a step's subnets are alternatives; each one's loss is measured without
    # gradient and only the lowest-loss one is trained (train.lowest_loss)
    min_min: bool = False
    # a fit that trains nothing: compress() fine-tunes for supernet_epochs + finetune_epochs instead
    finetunes_supernet_epochs: bool = False
    # the width space's default broadening (compressor/broaden.py): compress's broaden=None takes it
    broaden: float = 1.0
    # runs with a task other than classification (compress(task=...)): its training and scoring use
    # only the task's loss and per-sample score, never class logits
    tasks: bool = True
    summary: str = ""

    def parse_options(self, options=None):
        """The method's options dataclass from a dict (or an instance of it); an unknown name is
        refused with the valid ones."""
        if isinstance(options, self.options):
            return options
        options = dict(options or {})
        valid = [f.name for f in dataclasses.fields(self.options)]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ConfigError(f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
                              f"for method {self.name!r}: valid options are "
                              f"{', '.join(map(repr, valid)) or 'none'}")
        return self.options(**options)


def register(method: Method) -> Method:
    return METHODS.register(method.name, method)


def get_method(name) -> Method:
    """The registered method of that name (a Method is returned as it is)."""
    return name if isinstance(name, Method) else METHODS.get(name)


@dataclass
class FitContext:
    """What compress() hands a method's fit step: the (channel-ordered) model and its space, the
    training split and the held-out split for scoring, the budget and the settings of the run."""
    model: Any                  # channel-ordered by importance (compress's channel_order)
    space: Any
    train_data: Any
    held_out: Any
    budget: Any
    method: Method
    options: Any
    teacher: Any = None         # the frozen original when distilling, else None
    latency: Any = None         # the budget's latency constraint, or None
    limits: dict = dataclasses.field(default_factory=dict)
    epochs: float = 1.0
    batch_size: int = 64
    lr: float = 0.01
    effort: float = 0.25
    calib_batches: int = 20
    conv_impl: str = "auto"
    checkpoint_dir: str | None = None
    seed: int = 0
    progress: bool = True
    score_metric: str = "top1"  # what ranks candidates: "top1" or "loss"
    inherit: str = "supernet"   # the slim model's weights: "supernet", "original" or "best"
    sides: tuple | None = None  # the sides the search scores (None: the method's)
    seeds: list = dataclasses.field(default_factory=list)  # configurations in the initial population
    score_original: bool = False  # the search scores the weights before supernet training too
    window: Any = None          # samplers.TrainingWindow: the configurations training draws (None: all)
    sampling: str = "window"    # "anchored": training draws local moves around the best-scoring seed
    reconstruct: str = "none"   # "anchor" / "final": least-squares reconstruction of that configuration
    final_batches: int = 0      # batches past the calibration ones for the search's second look (0: none)
    restart: bool = False       # discard a checkpoint of another run instead of refusing it
    identity: dict = dataclasses.field(default_factory=dict)  # what else defines the run (for resume)
    output_fn: Any = None       # picks the logits from a model output that is not a tensor
    unordered: Any = None       # the model in its own channel order (None: channel_order "none")
    batches: Any = None         # how to batch train_data/held_out (validate.LoaderOptions: the user's
                                # DataLoader settings or compress's batch_size); None: batch_size
    keep_supernet: bool = False  # keep the trained supernet in Fitted.supernet (compress with out_dir)
    task: Any = None            # a tasks.Task other than classification (None: classification)


    def batched(self, data, shuffle=False, seed=0):
        """A DataLoader of `data` batched as compress() batches (the user's DataLoader settings, else
        batch_size)."""
        from ..finetune import loader
        if self.batches is not None:
            return self.batches.loader(data, shuffle=shuffle, seed=seed)
        return loader(data, self.batch_size, shuffle=shuffle, seed=seed)

    def calibration(self):
        """The training split in one random order fixed by the run's seed, the same on every pass:
        BN recalibration and reconstruction read its first batches, which must hold every class (an
        ImageFolder lists its images class by class)."""
        import torch
        order = torch.randperm(len(self.train_data), generator=torch.Generator().manual_seed(self.seed))
        return self.batched(torch.utils.data.Subset(self.train_data, order.tolist()))


@dataclass
class Fitted:
    """A fit step's result: the slim model (BN statistics calibrated), the search result that chose
    it, the latency delivery attempts and the stage timings."""
    model: Any
    found: Any
    attempts: list = dataclasses.field(default_factory=list)
    timings: dict = dataclasses.field(default_factory=dict)
    supernet: dict | None = None  # supernet methods with ctx.keep_supernet: weights, records, anchors, steps
