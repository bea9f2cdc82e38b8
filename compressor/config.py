"""What a compress() run is asked to do, as one typed, validated value: compress(**options) and the
CLI build the same CompressConfig, its fields are the run's identity for resuming, and a wrong
value is refused here, before any data is read."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .errors import ConfigError
from .formats import export_format

# channel_order: (importance criterion, the layout order_channels gives each group); "none" keeps
# the model's order
CHANNEL_ORDERS = {"l1": ("l1", "left"), "l1-both-ends": ("l1", "both-ends"), "none": None,
                  "l2": ("l2", "left"), "l2-both-ends": ("l2", "both-ends"),
                  "taylor": ("taylor", "left"), "taylor-both-ends": ("taylor", "both-ends")}
INHERIT = ("supernet", "original", "best")  # where the slim model's weights come from
SCORE_METRICS = ("top1", "loss")
# what supernet training draws: "anchored", local moves around the best-scoring seed configuration
# (within the window); "window", uniform draws within the window (the whole space without one)
SUPERNET_SAMPLING = ("anchored", "window")
# least-squares reconstruction (compressor.reconstruct) of "anchor", the configuration supernet
# training starts around, before training; of "final", the delivered one, from the weights before
# training; or "none"
RECONSTRUCT = ("anchor", "final", "none")
CONV_IMPLS = ("auto", "sliced", "reference", "cuda")  # kernels.IMPLS, which imports torch (tests keep them equal)
REPARAMS = (None, "repnas")
# how bins map to widths: "channels", equal channel steps; "flops", equal FLOPs steps (CafeNet's
# FLOPs-sensitive bins, space.flops_widths); space.BINNINGS, which imports torch (tests keep them equal)
BINNINGS = ("channels", "flops")  # re-parameterisable branches during fine-tuning (compressor/reparam.py)


def _choice(name, value, choices):
    if value not in choices:
        raise ConfigError(f"unknown {name} {value!r}: use {', '.join(map(repr, choices))}")


def _number(name, value, low, *, strict=True, integer=False):
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or (value <= low if strict else value < low):
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"{name} must be {kind} {'>' if strict else '>='} {low}, got {value!r}")


@dataclass(frozen=True)
class CompressConfig:
    """compress()'s options (README "Options"); every field has the default that was measured."""
    method: str = "recon"               # a registered method (compressor.methods.METHODS)
    method_options: dict | None = None  # that method's options, e.g. {"complementary": False}
    supernet_epochs: float = 1.0
    finetune_epochs: float = 1.0
    batch_size: int = 64
    lr: float = 0.01                    # supernet training
    finetune_lr: float = 0.01
    distill: bool = True                # the original teaches the subnets and the fine-tuned model
    effort: float = 0.25                # scales the evolutionary search (1.0 = the paper's 50 x 40)
    search_fraction: float = 0.1        # of train_data, held out to rank candidates
    calib_batches: int = 20             # BN recalibration batches per scored candidate
    bins: int = 20
    divisor: int | str = "auto"
    # of BINNINGS; None: "flops", or "channels" in a broadened space (FLOPs bins are laid out on the original
    # widths); chosen from the quality benchmark (README, Quality)
    binning: str | None = None
    exclude: tuple = ()
    # a channel-shuffled stream (ShuffleNetV2's) as one width variable (analyze's map_shuffles); off:
    # on a CIFAR-10 ShuffleNetV2 the delivered networks were worse with it (README)
    map_shuffles: bool = False
    seed: int = 0
    export: tuple = ()                  # of formats.EXPORT_FORMATS
    conv_impl: str = "auto"
    channel_order: str = "l2"           # of CHANNEL_ORDERS
    score_metric: str = "top1"          # of SCORE_METRICS
    seed_population: bool = True        # the uniform and global-importance configurations start the search
    inherit: str = "best"               # of INHERIT
    sides: tuple | None = None          # the sides the search scores (None: the method's)
    final_batches: int = 0              # the finalists' second look (0: none)
    supernet_window: float | None = 0.8  # train subnets costing [window x limit, limit] (None: all)
    supernet_sampling: str = "anchored"  # of SUPERNET_SAMPLING
    reconstruct: str = "anchor"         # of RECONSTRUCT (supernet methods; recon always reconstructs)
    score_original: bool = False        # the search scores the weights before supernet training too
    reparam: str | None = None          # of REPARAMS: "repnas" fine-tunes with searched branches, then fuses
    reparam_options: dict | None = None  # reparam.RepnasOptions, e.g. {"branches": 20}
    # widths up to broaden x the original (compressor/broaden.py; None: the method's, 1.5 for bsnas, else 1)
    broaden: float | None = None

    def __post_init__(self):
        fix = object.__setattr__  # frozen: normalise the containers once, here
        if isinstance(self.export, str):
            fix(self, "export", (self.export,))
        fix(self, "export", tuple(self.export))
        fix(self, "exclude", tuple(self.exclude))
        if self.sides is not None:
            fix(self, "sides", tuple(self.sides))
        for fmt in self.export:
            export_format(fmt)  # ConfigError naming the valid formats
        _choice("inherit", self.inherit, INHERIT)
        _choice("channel_order", self.channel_order, tuple(CHANNEL_ORDERS))
        _choice("score_metric", self.score_metric, SCORE_METRICS)
        _choice("supernet_sampling", self.supernet_sampling, SUPERNET_SAMPLING)
        _choice("reconstruct", self.reconstruct, RECONSTRUCT)
        _choice("conv_impl", self.conv_impl, CONV_IMPLS)
        if self.binning is not None:
            _choice("binning", self.binning, BINNINGS)
        for name in ("supernet_epochs", "finetune_epochs"):
            _number(name, getattr(self, name), 0, strict=False)
        for name in ("effort", "lr", "finetune_lr"):
            _number(name, getattr(self, name), 0)
        _number("calib_batches", self.calib_batches, 0, integer=True)
        _number("final_batches", self.final_batches, 0, strict=False, integer=True)
        if self.supernet_window is not None and (isinstance(self.supernet_window, bool) or not isinstance(
                self.supernet_window, (int, float)) or not 0 < self.supernet_window <= 1):
            raise ConfigError(f"supernet_window must be a fraction of the budget in (0, 1] or None, "
                              f"got {self.supernet_window!r}")
        if not self.seed_population and (self.method == "recon" or self.supernet_sampling == "anchored"):
            raise ConfigError('seed_population=False computes no seed configurations, but method "recon" and '
                              'supernet_sampling="anchored" (supernet methods) start from them: keep seed_population=True, '
                              'or use another method with supernet_sampling="window"')
        if not isinstance(self.map_shuffles, bool):
            raise ConfigError(f"map_shuffles must be True or False, got {self.map_shuffles!r}")
        if self.broaden is not None:
            from .broaden import check_ratio  # imports torch: only when asked for
            check_ratio(self.broaden, self.bins)
        _choice("reparam", self.reparam, REPARAMS)
        if self.reparam is None and self.reparam_options:
            raise ConfigError('reparam_options apply to reparam="repnas" (CLI: --reparam repnas): pass it too, '
                              'or leave the options out')
        if self.reparam == "repnas":
            from .reparam import RepnasOptions  # imports torch: only when asked for
            RepnasOptions.parse(self.reparam_options)
        if self.score_original and self.inherit == "supernet":
            raise ConfigError('score_original=True ranks candidates by the original weights too, but '
                              'inherit="supernet" never slims from them: use inherit="best" (the default) or "original"')

    @classmethod
    def build(cls, config: "CompressConfig | None" = None, **options) -> "CompressConfig":
        """`config` (or the defaults) with `options` replaced; an unknown option names the valid ones."""
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ConfigError(f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
                              f"for compress(): valid options are {', '.join(valid)}")
        return dataclasses.replace(config or cls(), **options)

    def identity(self) -> dict:
        """The fields that define the trained result (exports do not): a checkpoint resumes only a
        run with the same ones."""
        d = dataclasses.asdict(self)
        d.pop("export")
        return d
