"""The width space: one bin index per channel group, and what each configuration costs."""
from __future__ import annotations

import copy
import hashlib
import math

import numpy as np
import torch
from torch import nn

from .cost import CostModel
from .errors import ConfigError, UnsupportedModelError
from .heads import check_supported
from .groups import build_graph, find_groups, graph_time_limit, run_checked
from .shuffle import shuffled_streams
from .placement import is_placement, kept as placement_kept, parse as parse_placement

SIDES = ("left", "right")
BINNINGS = ("channels", "flops")  # config.BINNINGS too (the CLI reads it without torch; tests keep them equal)


def kept_channels(c: int, n: int, bins: int, divisor: int) -> int:
    """Channels kept by bin c (1..bins) of a group of n: k = max(divisor, round_to(c*n/bins,
    divisor)), never more than n, and exactly n at the last bin (the original model)."""
    if c == bins:
        return n
    k = divisor * int(np.floor(c * n / (bins * divisor) + 0.5))
    return min(n, max(divisor, k, 1))


def broadened_widths(n: int, bins: int, extra_bins: int, divisor: int) -> list:
    """Channels kept at bins 1..bins + extra_bins of a group of n original channels: kept_channels
    up to n at bin `bins`, then n plus kept_channels(j) at extra bin j (steps of n / bins, as below
    the original width)."""
    return [kept_channels(c, n, bins, divisor) for c in range(1, bins + 1)] + \
        [n + kept_channels(j, n, bins, divisor) for j in range(1, extra_bins + 1)]


def auto_divisor(n: int, cap: int = 8) -> int:
    """divisor="auto" for a group of n channels: the largest power of two up to `cap` that
    leaves the group at least 8 distinct widths (16 channels -> 2, 32 -> 4, 64 and more -> 8), so
    that narrow layers keep a useful choice of widths and wide ones keep the alignment."""
    d = 1
    while d * 2 <= cap and n // (d * 2) >= 8:
        d *= 2
    return d


def aligned_step(divisor: int, group) -> int:
    """The width step of `group` that keeps every layer's channel count a multiple of `divisor`: a
    group channel stands for one channel of each layer or more (one per group of a grouped conv:
    ResNeXt's 4 channels per group, 32 groups, need no step above 1 to stay multiples of 8)."""
    carried = min(table.shape[1] for table in group.index.values())
    return divisor // math.gcd(divisor, carried)


def _stream_widths(width_table, groups) -> np.ndarray:
    """The width table with each shuffled stream's widths moved down to the nearest width its
    wiring admits (compressor.shuffle; at least its narrowest)."""
    table = width_table.copy()
    for g, group in enumerate(groups):
        if group.stream is not None:
            admitted = group.stream.widths
            at = np.searchsorted(admitted, table[g, 1:], side="right") - 1
            table[g, 1:] = admitted[np.maximum(at, 0)]
    return table


def check_side(side: str) -> str:
    if side not in SIDES and not is_placement(side):
        raise ConfigError(f"unknown side {side!r}: use 'left' (channels [0, k)), 'right' (channels [n-k, n)) "
                          f"or a CafeNet placement ('free:...', compressor.placement)")
    return side


def flops_widths(cost, sizes, bins: int, divisors) -> np.ndarray:
    """FLOPs-sensitive bins (CafeNet, METHOD section 8): (G, bins + 1) widths where each distinct
    width of a group adds about the same FLOPs, the same step in every group. The step is the
    costliest group's FLOPs (the network's FLOPs that depend on its width, the others full) over
    `bins`, so that group keeps `bins` widths and a cheaper one proportionally fewer (at least
    2, choice: a group stays searchable). A group's m widths are the aligned widths whose FLOPs are
    nearest to 1/m, 2/m, ... of its span; bin c maps to width ceil(c * m / bins)."""
    sizes = np.asarray(sizes, dtype=np.int64)
    full = float(cost.flops(sizes))
    curves, spans = [], []
    for g, n in enumerate(sizes):
        widths = np.tile(sizes, (n + 1, 1))
        widths[:, g] = np.arange(n + 1)
        curve = np.asarray(cost.flops(widths), dtype=np.float64)  # FLOPs at width 0..n, the others full
        curves.append(curve)
        spans.append(full - curve[0])
    step = max(spans) / bins
    table = np.zeros((len(sizes), bins + 1), dtype=np.int64)
    for g, (n, curve, span) in enumerate(zip(sizes, curves, spans)):
        m = int(min(bins, max(2, np.floor(span / step + 0.5)))) if step > 0 else bins
        allowed = np.unique(np.r_[np.arange(divisors[g], n + 1, divisors[g]), n]) if n > divisors[g] else np.array([n])
        levels = [int(allowed[np.argmin(np.abs(curve[allowed] - curve[0] - j * span / m))]) for j in range(1, m + 1)]
        levels[-1] = int(n)  # the last bin is the original width
        levels = np.maximum.accumulate(levels)
        table[g, 1:] = [levels[int(np.ceil(c * m / bins)) - 1] for c in range(1, bins + 1)]
    return table


def check_model(model, example_input):
    if isinstance(model, (torch.jit.ScriptModule, torch.jit.ScriptFunction)):
        raise ConfigError("model is a TorchScript module: pass the eager module (the nn.Module before "
                          "torch.jit.script/trace); a script module's graph cannot be traced and sliced")
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(example_input, torch.Tensor):
        raise ConfigError(
            f"example_input must be a torch.Tensor (e.g. torch.randn(1, 3, 224, 224)), got {type(example_input).__name__}")


def fingerprint(model: nn.Module) -> str:
    """Short hash of the architecture (module names, types and parameter shapes)."""
    h = hashlib.sha1()
    for name, module in model.named_modules():
        h.update(f"{name}:{type(module).__name__};".encode())
    for name, p in model.named_parameters():
        h.update(f"{name}:{tuple(p.shape)};".encode())
    return h.hexdigest()[:16]


class WidthSpace:
    """Configurations are tuples of bin indices, one per group, each in 1..bins (or the group's
    min/max bins)."""

    def __init__(self, groups, frozen, cost, *, bins, divisor, example_input, min_bins, max_bins,
                 source=None, model_fingerprint="", extra_bins=0, original_sizes=None, binning="channels"):
        self.groups = groups
        self.frozen = frozen
        self.cost = cost
        # a broadened space (compressor.broaden) has `extra_bins` bins above the original width: bins
        # 1..base_bins reach the original size, the extra ones the groups' broadened sizes
        self.base_bins = bins
        self.extra_bins = extra_bins
        self.bins = bins + extra_bins
        self.divisor = divisor
        self.binning = binning
        self.sizes = np.array([g.size for g in groups], dtype=np.int64)
        self.example_input = example_input
        self.source = source
        self.fingerprint = model_fingerprint
        self.min_bins = np.asarray(min_bins, dtype=np.int64)
        self.max_bins = np.asarray(max_bins, dtype=np.int64)
        # the groups' sizes in the model before broadening: relative budgets are relative to it
        self.original_sizes = self.sizes.copy() if original_sizes is None else np.asarray(original_sizes, np.int64)
        # width_table[g, c]: channels kept in group g at bin c (column 0 unused)
        divisors = [aligned_step(auto_divisor(int(n)) if divisor == "auto" else divisor, group)
                    for n, group in zip(self.original_sizes, groups)]
        if binning == "flops":
            if extra_bins:
                raise ConfigError("binning='flops' and a broadened space (broaden > 1) cannot be combined: "
                                  "use binning='channels' with broaden, or broaden=1 with binning='flops'")
            self.width_table = flops_widths(cost, self.sizes, bins, divisors)
        else:
            self.width_table = np.array(
                [[0] + broadened_widths(int(n), bins, extra_bins, d) for n, d in zip(self.original_sizes, divisors)],
                dtype=np.int64).reshape(len(groups), self.bins + 1)
        self.width_table = _stream_widths(self.width_table, groups)
        if not np.array_equal(self.width_table[:, -1], self.sizes):
            raise ConfigError(f"the groups' sizes {self.sizes.tolist()} are not the widest bins "
                              f"{self.width_table[:, -1].tolist()}: a broadened space needs cz.broaden's model")
        self._rows = np.arange(len(groups))
        # (G, bins + 1): the bins a configuration may use (WidthSpace.shrunk switches widths off)
        bins_index = np.arange(self.bins + 1)
        self.allowed = (bins_index >= self.min_bins[:, None]) & (bins_index <= self.max_bins[:, None])
        self._set_levels()
        # runtime name -> latency model (compressor.latency.build_latency_model sets them): the
        # space's third cost, held here so that the space never imports the latency package
        self.latency_models = {}

    def _set_levels(self):
        # per group, the lowest allowed bin of each distinct width, ascending (WidthSpace.step)
        self._levels = []
        for g, row in enumerate(self.allowed):
            bins = np.flatnonzero(row)
            self._levels.append(bins[np.unique(self.width_table[g, bins], return_index=True)[1]])

    def levels(self, g: int) -> np.ndarray:
        """Group g's distinct allowed widths, each as its lowest bin, narrowest first."""
        return self._levels[g]

    def __len__(self):
        return len(self.groups)

    @property
    def broadened(self) -> bool:
        return bool(self.extra_bins)

    def original(self) -> tuple:
        """The configuration of the original widths (every bin of an unbroadened space: its max)."""
        return tuple(int(c) for c in np.clip(self.base_bins, self.min_bins, self.max_bins))

    # -- shrinking (BS-NAS) ------------------------------------------------------------------
    def shrunk(self, off) -> "WidthSpace":
        """This space with more widths switched off: `off` is a (G, bins + 1) bool array of bins;
        every bin that keeps the same channels as a switched-off one is off too. The copy shares
        everything else (groups, cost model, latency models); configurations keep their meaning.
        Switching off a group's every width is refused."""
        off = np.asarray(off, dtype=bool)
        if off.shape != self.allowed.shape:
            raise ConfigError(f"switched-off bins need shape {self.allowed.shape}, got {off.shape}")
        widths_off = np.where(off, self.width_table, -1)
        same = (self.width_table[:, :, None] == widths_off[:, None, :]).any(2)  # [g, c]: c keeps an off width
        allowed = self.allowed & ~same
        empty = np.flatnonzero(~allowed.any(1))
        if len(empty):
            raise ConfigError(f"switching off every width of group '{self.groups[empty[0]].name}' is refused: "
                              f"a group keeps at least one width")
        new = copy.copy(self)
        new.allowed = allowed
        new._set_levels()
        return new

    def allows(self, cfgs) -> np.ndarray:
        """(B,) bool: which configurations of a (B, G) array use only allowed (not switched-off) bins."""
        cfgs = np.atleast_2d(np.asarray(cfgs, dtype=np.int64))
        return self.allowed[self._rows, cfgs].all(1)

    def without(self, model: nn.Module, reasons: dict) -> "WidthSpace":
        """This space with the groups at the indices of `reasons` frozen, each for its reason
        (their channels stay full; the cost model is rebuilt on `model`, the model this space was
        analysed on)."""
        drop = set(reasons)
        keep = [g for i, g in enumerate(self.groups) if i not in drop]
        if not keep:
            raise UnsupportedModelError(f"no channel group can be slimmed: {'; '.join(reasons.values())}",
                                        module=self.groups[min(drop)].name, op="no prunable group")
        rows = [i for i in range(len(self.groups)) if i not in drop]
        work = copy.deepcopy(model).eval()
        example = self.example_input.to(next(work.parameters()).device)
        return WidthSpace(keep, {**self.frozen, **{self.groups[i].name: reasons[i] for i in sorted(drop)}},
                          CostModel(work, keep, example), bins=self.base_bins, divisor=self.divisor,
                          example_input=self.example_input, min_bins=self.min_bins[rows],
                          max_bins=self.max_bins[rows], source=self.source, model_fingerprint=self.fingerprint,
                          extra_bins=self.extra_bins, original_sizes=self.original_sizes[rows], binning=self.binning)


    def __repr__(self):
        return (f"WidthSpace({len(self.groups)} groups, {len(self.frozen)} frozen, bins={self.bins}, "
                f"divisor={self.divisor}, binning={self.binning}"
                f"{f', {self.extra_bins} above the original width' if self.extra_bins else ''})")

    def size(self) -> int:
        """How many distinct networks the space holds (the product of each group's distinct widths)."""
        return int(np.prod([len(levels) for levels in self._levels], dtype=object))

    # -- configurations ------------------------------------------------------------------
    def check(self, cfg) -> tuple:
        """Validate a configuration and return it as a tuple of ints."""
        return tuple(self._valid(cfg).tolist())

    def _valid(self, cfg) -> np.ndarray:
        try:
            arr = np.asarray(cfg)
        except Exception as e:
            raise ConfigError(f"a configuration must be a sequence of integers, got {cfg!r}") from e
        if arr.ndim != 1 or arr.shape[0] != len(self.groups):
            raise ConfigError(
                f"a configuration needs one bin per group: {len(self.groups)} entries, got "
                f"{arr.shape[0] if arr.ndim == 1 else 'shape ' + str(arr.shape)}")
        if arr.dtype.kind not in "iu":
            if arr.dtype.kind != "f" or not np.all(arr == np.round(arr)):
                raise ConfigError(f"configuration entries must be integers, got {cfg!r}")
            arr = arr.astype(np.int64)
        bad = (arr < self.min_bins) | (arr > self.max_bins)
        if bad.any():
            i = int(np.argmax(bad))
            raise ConfigError(
                f"configuration entry {i} (group '{self.groups[i].name}') is {int(arr[i])}, outside "
                f"its allowed bins {int(self.min_bins[i])}..{int(self.max_bins[i])}")
        return arr

    def max(self) -> tuple:
        """The widest allowed bin of every group."""
        return tuple(int(self.bins - np.argmax(row[::-1])) for row in self.allowed)

    def min(self) -> tuple:
        """The narrowest allowed bin of every group."""
        return tuple(int(np.argmax(row)) for row in self.allowed)

    def uniform(self, ratio: float) -> tuple:
        """The same width ratio of the original width in every group (nearest bin, clipped to each
        group's bounds); up to bins / base_bins in a broadened space."""
        top = self.bins / self.base_bins
        if not 0 < ratio <= top:
            raise ConfigError(f"uniform ratio must be in (0, {top:g}], got {ratio}")
        c = int(np.floor(ratio * self.base_bins + 0.5))
        return tuple(int(v) for v in np.clip(c, self.min_bins, self.max_bins))

    def random(self, seed=None) -> tuple:
        """Each group's bin drawn uniformly from its allowed bins. `seed` is an int or a
        numpy Generator."""
        rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        # integers(0, count) + offset draws what integers(lo, hi + 1) draws on an unshrunk space
        picks = rng.integers(0, self.allowed.sum(1))
        return tuple(int(np.flatnonzero(row)[i]) for row, i in zip(self.allowed, picks))

    def step(self, cfgs, moves) -> np.ndarray:
        """Configurations (B, G) with group g moved `moves[:, g]` distinct widths wider (negative:
        narrower), clipped to its allowed bins. Bins that keep the same channels are one width, so
        a move of 1 always changes the network (unless the group is at its bound); the result holds
        the lowest bin of each width."""
        cfgs = np.atleast_2d(np.asarray(cfgs, dtype=np.int64))
        moves = np.broadcast_to(np.asarray(moves, dtype=np.int64), cfgs.shape)
        out = np.empty_like(cfgs)
        for g, levels in enumerate(self._levels):
            widths = self.width_table[g, levels]
            at = np.searchsorted(widths, self.width_table[g, cfgs[:, g]])
            out[:, g] = levels[np.clip(at + moves[:, g], 0, len(levels) - 1)]
        return out

    def channels(self, cfg) -> list:
        """Kept channels per group."""
        cfg = self.check(cfg)
        return [int(k) for k in self.width_table[self._rows, cfg]]

    def windows(self, cfg, side="left") -> list:
        """(start, length) of the kept channels of each group on that side, or None for a group whose
        kept channels (a placement's) are not one window."""
        return [(int(p[0]), len(p)) if len(p) and p[-1] - p[0] + 1 == len(p) else None
                for p in self.positions(cfg, side)]

    def positions(self, cfg, side="left") -> list:
        """Per group, the ascending positions (0..n-1, the index tables' rows) of its kept channels
        on that side: [0, k) on the left, [n - k, n) on the right, a placement's base and free
        channels (compressor.placement)."""
        check_side(side)
        widths = self.channels(cfg)
        if side in SIDES:
            kept = [np.arange(k) if side == "left" else np.arange(int(n) - k, int(n))
                    for n, k in zip(self.sizes, widths)]
        else:
            kept = [placement_kept(int(n), k, free, g.name)
                    for n, k, free, g in zip(self.sizes, widths, parse_placement(side, len(self.groups)), self.groups)]
        # a shuffled stream is one-sided: any other channels than its left window break its wiring
        return [np.arange(k) if g.stream is not None else p for p, k, g in zip(kept, widths, self.groups)]

    # -- cost ----------------------------------------------------------------------------
    def _widths(self, cfg):
        arr = np.asarray(cfg)
        if arr.ndim == 2:  # a batch of configurations: vectorised, no per-row validation
            if arr.shape[1] != len(self.groups):
                raise ConfigError(f"configurations need {len(self.groups)} entries each, got {arr.shape[1]}")
            return self.width_table[self._rows, arr]
        return self.width_table[self._rows, self._valid(cfg)]

    def flops(self, cfg):
        """FLOPs of one sample (one multiply-add = 2) at the example input's size. A 2-D array of
        configurations gives an array."""
        value = self.cost.flops(self._widths(cfg))
        return value if np.ndim(value) else int(round(float(value)))

    def params(self, cfg):
        value = self.cost.params(self._widths(cfg))
        return value if np.ndim(value) else int(round(float(value)))

    def set_latency_model(self, model):
        """Make `latency(cfg, runtime)` and latency budgets on that runtime use `model` (a
        compressor.latency.LatencyModel: .target.runtime, .predict, .expected, .original_us)."""
        self.latency_models[model.target.runtime] = model

    def latency_model(self, target):
        """The latency model of `target` (a runtime name such as 'ort-cpu', or a Target)."""
        name = getattr(target, "runtime", target)
        found = self.latency_models.get(name)
        if found is None:
            raise ConfigError(f"no latency model for target {name!r} on this width space: build one with "
                              f"compressor.latency.build_latency_model(model, space, {name!r}) "
                              f"(compress() does this for latency budgets)")
        return found

    def cost_function(self, metric, target=None):
        """(cost, original): `cost` maps configurations (B, G) to their costs (B,) in `metric`
        ('flops', 'params', or 'latency' in microseconds on `target`, predicted by its latency
        model); `original` is the full model's cost (for latency, measured end to end)."""
        if metric == "latency":
            return (lambda cfgs: self.latency(cfgs, target)), self.latency_model(target).original_us
        return getattr(self, metric), float(getattr(self.cost, metric)(self.original_sizes))

    def latency(self, cfg, target):
        """Predicted latency in microseconds on `target` (a runtime name such as 'ort-cpu') by the
        latency model set with compressor.latency.build_latency_model. A 2-D array of
        configurations gives an array (vectorised table lookups)."""
        model = self.latency_model(target)
        arr = np.asarray(cfg)
        if arr.ndim == 2:
            if arr.shape[1] != len(self.groups):
                raise ConfigError(f"configurations need {len(self.groups)} entries each, got {arr.shape[1]}")
            return model.predict(arr)
        return float(model.predict([self.check(cfg)])[0])

    def describe(self) -> str:
        """A table of the groups: name, channels, members."""
        lines = [f"{'group':48s} {'channels':>8s} {'members':>8s}"]
        for g in self.groups:
            lines.append(f"{g.name:48s} {g.size:8d} {len(g.members):8d}")
        for name, reason in self.frozen.items():
            lines.append(f"{name:48s} {'frozen':>8s}  {reason}")
        return "\n".join(lines)


def _modules_run(model, x):
    """The modules a forward pass of `x` runs, in the model's current mode."""
    ran, handles = set(), [m.register_forward_hook(lambda m, i, o: ran.add(m)) for m in model.modules()]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return ran


def _traced(work, example_input):
    """Torch-Pruning's graph of `work` (a private copy, in eval mode; left in eval mode). When
    train mode runs modules that eval mode skips (GoogLeNet's and Inception's aux classifiers),
    the graph is traced in train mode so that they are slimmed with the channels they consume."""
    evaluated = _modules_run(work, example_input)
    pair = example_input[:1].expand(2, *example_input.shape[1:])  # train-mode batch norms need 2 samples
    work.train()
    try:
        extra = _modules_run(work, pair) - evaluated
    except Exception:  # a model that cannot run in train mode here: trace what eval mode runs
        extra = set()
    try:
        return build_graph(work, pair if extra else example_input, train_mode=bool(extra))
    finally:
        work.eval()


def analyze(model: nn.Module, example_input: torch.Tensor, bins: int = 20, divisor: int = 8,
            exclude=(), min_ratio: float = 0.0, max_ratio: float = 1.0, time_limit: float = 300.0,
            binning: str = "channels", map_shuffles: bool = False) -> WidthSpace:
    """Find the channel groups of `model` and build its width space and exact cost model.

    `divisor`: widths are multiples of it (1 disables alignment); "auto" picks one per group
    with auto_divisor. `exclude` holds module names or types whose output channels stay fixed. `min_ratio` and
    `max_ratio` bound every group's width (as a fraction of its original size). `time_limit`:
    seconds Torch-Pruning's tracing and grouping may take before an UnsupportedModelError (some
    graphs make it loop for hours; None: no limit). `binning`: "channels", bin c keeps c/bins of
    a group's channels; "flops", CafeNet's FLOPs-sensitive bins (flops_widths): every width step
    adds about the same FLOPs, so cheap groups get coarser bins and the space is smaller (bins still
    index 1..bins, and min_ratio/max_ratio still bound the bin index). `map_shuffles`: make each
    channel-shuffled stream (ShuffleNetV2's) one width variable (compressor.shuffle) instead of
    keeping it at its full width; off by default, because on a CIFAR-10 ShuffleNetV2 compress()
    delivered worse networks with it (README, "ShuffleNetV2"). The model is not modified: the
    analysis runs on a copy.
    """
    check_model(model, example_input)
    if not isinstance(bins, int) or bins < 1:
        raise ConfigError(f"bins must be a positive integer, got {bins!r}")
    if divisor != "auto" and (not isinstance(divisor, int) or divisor < 1):
        raise ConfigError(f"divisor must be a positive integer (1 disables alignment) or 'auto', got {divisor!r}")
    if binning not in BINNINGS:
        raise ConfigError(f"unknown binning {binning!r}: use 'channels' (equal channel steps) or 'flops' "
                          f"(equal FLOPs steps, CafeNet)")
    if not 0 <= min_ratio <= max_ratio <= 1 or max_ratio == 0:
        raise ConfigError(f"need 0 <= min_ratio <= max_ratio <= 1 and max_ratio > 0, got {min_ratio}, {max_ratio}")
    if isinstance(exclude, (str, type)):
        exclude = (exclude,)

    check_supported(model)
    work = copy.deepcopy(model).eval()
    example_input = example_input.detach().to(next(work.parameters(), example_input).device)
    with torch.no_grad():
        run_checked(work, example_input, "analyze")
    with graph_time_limit(time_limit, work):
        graph = _traced(work, example_input)
        groups, frozen = find_groups(work, graph, exclude)
    if not isinstance(map_shuffles, bool):
        raise ConfigError(f"map_shuffles must be True or False, got {map_shuffles!r}")
    if map_shuffles:
        streams, solved = shuffled_streams(work, example_input, groups, frozen,
                                           lambda n: auto_divisor(n) if divisor == "auto" else divisor)
        groups = groups + streams
        frozen = {name: reason for name, reason in frozen.items() if name not in solved}
    if not groups:
        reasons = "; ".join(f"{n}: {r}" for n, r in list(frozen.items())[:5])
        raise UnsupportedModelError(
            f"{type(model).__name__} has no channel group that can be slimmed ({reasons})",
            module=next(iter(frozen), type(model).__name__), op="no prunable group")
    cost = CostModel(work, groups, example_input)
    lo = max(1, int(np.ceil(min_ratio * bins)))
    hi = max(lo, int(np.floor(max_ratio * bins + 1e-9)))
    return WidthSpace(groups, frozen, cost, bins=bins, divisor=divisor,
                      example_input=example_input[:1].cpu().clone(),
                      min_bins=[lo] * len(groups), max_bins=[hi] * len(groups),
                      source=getattr(model, "_compressor_source", None),
                      model_fingerprint=fingerprint(model), binning=binning)
