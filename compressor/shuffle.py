"""Shuffled streams: channels that travel between layers only through concatenations, chunks and
channel shuffles (ShuffleNetV2's stages), mapped as one width variable per stream.

Torch-Pruning cannot map a channel shuffle, so find_groups freezes every group that reaches one.
Here such a stream is traced by a probe instead: every layer of LAYER_KINDS is replaced by a stub
that outputs constant "tags" (one number per channel), the model's own forward moves them through
its cats, chunks and shuffles, and each layer records which producer channel arrives at each of its
inputs. Running the probe again with the stream's producers narrowed to w channels shows what a
slim network of width w does with its channels: which reader each of its channels reaches.

A slim network computes what the masked one computes when each kept channel reaches the same
readers in both, so the kept channels of every producer must have, reader set by reader set, the
counts the width-w network has (ShuffleNetV2: a branch's output channel i lives until the block
where the shuffles, which double its position, push it into the half the next chunk feeds to a
branch). Widths where the full network has fewer channels of some reader set are impossible; the
others form a chain of nested kept sets (width w keeps a subset of width w' > w), and the stream's
widths are the longest such chain through the most multiples of the divisor. The slim network
keeps each producer's channels in the order its own wiring needs (`Stream.arrangements`), not in
ascending order, so slimming permutes as well as removes. Within a reader set, a producer keeps
its channels of largest L1 norm first. The group is one-sided: BCNet's right path and CafeNet's
free channels keep the same channels as the left path (any other set breaks the wiring).
"""
from __future__ import annotations

import copy
import types
from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from .groups import SHUFFLE_MARK, ChannelGroup, Member
from .layers import kind_of
from .modes import hooked_forward

_TAG = 1 << 20  # code of channel i of layer m: m * _TAG + i
_BASE = float(1 << 40)  # its tag: _BASE + code, exact in float64; a sum of tags decodes to nothing


@dataclass
class Stream:
    """What makes a group a shuffled stream: its admissible widths (ascending, the last one its
    size) and, per width, every member layer's kept indices in the slim network's order."""
    widths: np.ndarray
    arrangements: dict  # width -> {(module, role): int array of layer indices, slim order}


def shuffled_streams(model: nn.Module, example_input: torch.Tensor, groups, frozen: dict, step) -> tuple:
    """(streams, solved): ChannelGroups for the shuffled streams of `model`, and the names of the
    frozen groups they replace. Only runs where some frozen group's reason is a channel shuffle
    (SHUFFLE_MARK); a stream that cannot be mapped stays frozen (empty result).
    `step(size)`: the divisor whose multiples the chosen widths should include."""
    roots = {name for name, reason in frozen.items() if SHUFFLE_MARK in reason}
    if not roots:
        return [], set()
    try:
        return _streams(model, example_input, groups, frozen, step, roots)
    except _NotAStream:
        return [], set()


class _NotAStream(Exception):
    """The frozen channels do not form a stream the probe can map: they stay frozen."""


def _streams(model, example_input, groups, frozen, step, roots):
    names = [n for n, m in model.named_modules() if kind_of(m) is not None]
    shapes = {}

    def record(name):
        def hook(module, inputs, output):
            if torch.is_tensor(output):
                shapes.setdefault(name, tuple(output.shape))
        return hook

    hooked_forward(model, example_input, lambda: [model.get_submodule(n).register_forward_hook(record(n))
                                                  for n in names])
    stubbed = _Stubbed(model, names, shapes, example_input)
    full = stubbed.run({})
    taken = {(m.module, m.role) for g in groups for m in g.members}
    # candidate producers: layers that make channels of their own which no width group holds
    producers = [n for n in names if n in shapes and kind_of(model.get_submodule(n)).in_dim is not None
                 and (n, "out") not in taken]
    streams, solved = [], set()
    for component in _components(full, producers):
        if not any(name in roots for name in component):
            continue  # no channel shuffle among them: not a stream of ours
        group = _stream_group(model, stubbed, full, component, taken, step)
        if group is not None:
            streams.append(group)
            solved |= {name for name, _ in group.index if name in frozen}
    return streams, solved


class _Stubbed:
    """A float64 copy of the model whose every LAYER_KINDS layer outputs its tags and records the
    tags arriving at its input (as codes m * _TAG + i, -1 where an input is no single channel)."""

    def __init__(self, model, names, shapes, example_input):
        self.model = copy.deepcopy(model).double()
        self.names, self.shapes = names, shapes
        self.passes = np.array([kind_of(model.get_submodule(n)).in_dim is None for n in names])
        self.example = example_input.detach().double()
        self.narrow, self.poisoned, self.reads, self.tainted, self.output_tainted = {}, set(), {}, {}, False
        for m, name in enumerate(names):
            module = self.model.get_submodule(name)
            module.forward = types.MethodType(self._stub(m, name, kind_of(module)), module)

    def _stub(self, m, name, kind):
        dim = kind.channel_dim

        def forward(module, x, *args, **kwargs):
            values = x.detach().movedim(dim, -1).reshape(-1, x.shape[dim])
            first = values[0]
            valid = (values == first).all(0) & (first >= _BASE) & (first < _BASE + len(self.names) * _TAG) \
                & (first == first.round())
            self.reads[m] = torch.where(valid, first - _BASE, -1).long().cpu().numpy()
            self.tainted[m] = values.isnan().any(0).cpu().numpy()
            shape = list(self.shapes[name])
            shape[0] = x.shape[0]
            channels = self.narrow.get(name, x.shape[dim] if kind.in_dim is None else shape[dim])
            shape[dim] = channels
            tags = _BASE + m * _TAG + torch.arange(channels, dtype=torch.float64, device=x.device)
            if name in self.poisoned:
                tags = torch.full_like(tags, float("nan"))
            view = [1] * len(shape)
            view[dim] = channels
            return tags.view(view).expand(shape).clone()
        return forward

    def run(self, narrow, poisoned=()):
        """The probe with the layers of `narrow` ({name: channels}) at those widths: a _Wiring."""
        self.narrow, self.poisoned, self.reads, self.tainted = narrow, set(poisoned), {}, {}
        with torch.no_grad():
            try:
                output = self.model(self.example)
            except Exception as e:  # the model's own forward rejects these widths
                raise _NotAStream(str(e)) from e
        self.output_tainted = any(torch.is_tensor(t) and t.isnan().any() for t in tree_leaves(output))
        return _Wiring(self.names, self.passes, self.reads)

    def leaks(self, producers, members, wiring):
        """Whether the channels of `producers` reach anything but layers reading them whole: the
        model's output, or an op that mixes them with other values (an add, a product) before a
        layer. Every layer carrying them (`members` on role "out") outputs NaN in one probe; every
        layer input the NaN reaches must be one of their channels as such."""
        self.run({}, poisoned={name for name, role in members if role == "out"})
        ours = {wiring.index[p] for p in producers}
        for m, tainted in self.tainted.items():
            codes = wiring.inputs(self.names[m])
            mine = np.array([c >= 0 and c // _TAG in ours for c in codes], dtype=bool)
            if (tainted & ~mine).any():
                return True
        return self.output_tainted


class _Wiring:
    """One probe's result: for each layer, the origin of each input channel as a code
    m * _TAG + i (channel i of layer names[m]), following batch norms and depthwise convs (whose
    channels are their inputs') back to the layer that made the channel; -1 where an input is no
    single channel."""

    def __init__(self, names, passes, reads):
        self.names, self.passes, self.raw = names, passes, reads
        self.index = {n: m for m, n in enumerate(names)}
        self._resolved = {}

    def inputs(self, name):
        m = self.index[name]
        return self._resolve(m) if m in self.raw else None

    def _resolve(self, m):
        if m not in self._resolved:
            codes = self.raw[m].copy()
            layer = np.where(codes >= 0, codes // _TAG, 0)
            for q in np.unique(layer[(codes >= 0) & self.passes[layer]]):
                at = (codes >= 0) & (layer == q)
                source = self._resolve(q) if q in self.raw else np.empty(0, dtype=np.int64)
                channel = codes[at] % _TAG
                inside = channel < len(source)
                codes[at] = np.where(inside, source[np.where(inside, channel, 0)], -1) if len(source) else -1
            self._resolved[m] = codes
        return self._resolved[m]


def _components(wiring, producers):
    """Producers joined by the layers that read their channels: each component is one stream."""
    parent = {wiring.index[p]: wiring.index[p] for p in producers}

    def find(p):
        while parent[p] != p:
            parent[p] = parent[parent[p]]
            p = parent[p]
        return p

    for name in wiring.names:
        codes = wiring.inputs(name)
        if codes is None:
            continue
        read = sorted({int(m) for m in np.unique(codes[codes >= 0] // _TAG) if int(m) in parent})
        for other in read[1:]:
            parent[find(other)] = find(read[0])
    components = defaultdict(list)
    for p in sorted(parent):
        components[find(p)].append(wiring.names[p])
    return list(components.values())


def _members(model, wiring, producers, width=None):
    """{(layer, role): origin codes of its channels on that role} of every layer whose channels on
    a role come from `producers` (at `width` channels each, default their own) only; None when
    some layer mixes them with other channels."""
    ours = np.array([wiring.index[p] for p in producers])
    members = {}
    for name in wiring.names:
        module = model.get_submodule(name)
        kind = kind_of(module)
        if name in producers:
            members[(name, "out")] = wiring.index[name] * _TAG + np.arange(width or kind.size(module, "out"))
            continue
        codes = wiring.inputs(name)
        if codes is None or not len(codes):
            continue
        mine = (codes >= 0) & np.isin(np.where(codes >= 0, codes // _TAG, -1), ours)
        if not mine.any():
            continue
        if not mine.all():
            return None
        members[(name, "out" if kind.in_dim is None else "in")] = codes
    return members


def _classes(members, readers, producers, index, width):
    """Per producer, the reader set of each of its `width` channels: a tuple of how often each
    reader reads it."""
    local = {index[p]: k for k, p in enumerate(producers)}
    counts = np.zeros((len(producers), width, len(readers)), dtype=np.int64)
    for r, key in enumerate(readers):
        codes = members[key]
        layer = np.array([local[int(m)] for m in codes // _TAG])
        np.add.at(counts, (layer, codes % _TAG, r), 1)
    return {p: [tuple(row) for row in counts[k].tolist()] for k, p in enumerate(producers)}


def _stream_group(model, stubbed, full, producers, taken, step):
    size = {kind_of(model.get_submodule(p)).size(model.get_submodule(p), "out") for p in producers}
    if len(producers) < 2 or len(size) != 1:
        return None
    size = size.pop()
    members = _members(model, full, set(producers))
    if members is None or any(key in taken for key in members) or stubbed.leaks(producers, members, full):
        return None
    readers = [key for key in members if key[1] == "in"]
    if not readers:
        return None
    full_classes = _classes(members, readers, producers, full.index, size)
    capacity = {p: Counter(c) for p, c in full_classes.items()}
    at_width = {size: (full_classes, members)}
    for w in range(1, size):
        try:
            wiring = stubbed.run({p: w for p in producers})
        except _NotAStream:
            continue
        slim_members = _members(model, wiring, set(producers), w)
        if slim_members is None or set(slim_members) != set(members):
            continue
        found = _classes(slim_members, readers, producers, full.index, w)
        if all(not (Counter(found[p]) - capacity[p]) for p in producers):
            at_width[w] = (found, slim_members)
    widths = _chain(at_width, producers, size, step)
    if len(widths) < 2:
        return None
    rows = _rows(model, producers, full_classes, at_width, widths)  # (producers, size)
    local = {full.index[p]: k for k, p in enumerate(producers)}

    def rows_of(codes):
        return rows[[local[int(m)] for m in codes // _TAG], codes % _TAG]

    index = {}
    for key, codes in members.items():
        table = _table(rows_of(codes), widths)
        if table is None:
            return None
        index[key] = table
    arrangements = {}
    for w in widths:
        arranged = _arrangement(w, producers, full_classes, at_width[w], members, rows, local)
        if set(arranged) != set(members):
            return None
        for key, kept in arranged.items():
            if not np.array_equal(np.sort(kept), np.sort(index[key][:w].ravel())):
                return None  # the wiring at w keeps other channels than the table's prefix
        arrangements[int(w)] = arranged
    stream = Stream(np.asarray(widths, dtype=np.int64), arrangements)
    group_members = tuple(Member(name, role, kind_of(model.get_submodule(name)).name) for name, role in members)
    return ChannelGroup(producers[0], size, group_members, index, stream=stream)


def _chain(at_width, producers, size, step):
    """The admissible widths: the chain of nested class counts ending at `size` that holds the most
    multiples of `step(size)` (then the most widths)."""
    counts = {w: {p: Counter(c[p]) for p in producers} for w, (c, _) in at_width.items()}
    widths = sorted(at_width)
    divisor = step(size)

    def below(a, b):  # every class count of width a at most that of width b
        return all(not (counts[a][p] - counts[b][p]) for p in producers)

    best = {size: ((1 if size % divisor == 0 else 0, 1), None)}
    for w in reversed(widths[:-1]):
        options = [((score[0] + (w % divisor == 0), score[1] + 1), v)
                   for v, (score, _) in best.items() if v > w and below(w, v)]
        if options:
            best[w] = max(options)
    start = max(best, key=lambda w: best[w][0])
    chain = []
    while start is not None:
        chain.append(start)
        start = best[start][1]
    return chain


def _rows(model, producers, full_classes, at_width, widths):
    """(producers, size) int array, each producer channel's group row: going up the chain, each
    step adds, per producer and class, the channels the wider width needs, largest L1 norm first."""
    rows = np.full((len(producers), widths[-1]), -1, dtype=np.int64)
    for k, p in enumerate(producers):
        weight = model.get_submodule(p).weight.detach().abs().flatten(1).sum(1).cpu().numpy()
        by_class = defaultdict(list)
        for i in np.argsort(-weight, kind="stable"):
            by_class[full_classes[p][i]].append(int(i))
        used = Counter()
        for lo, hi in zip([0, *widths[:-1]], widths):
            new = []
            for cls, count in Counter(at_width[hi][0][p]).items():
                new += by_class[cls][used[cls]:count]
                used[cls] = count
            rows[k, sorted(new)] = np.arange(lo, hi)
    return rows


def _table(rows, widths):
    """A member's index table from the group row of each of its layer indices: the indices of each
    chain step spread evenly over the step's rows (in a step, any row carries any of them: only
    whole steps are ever kept)."""
    per_row = len(rows) / widths[-1]
    if per_row != int(per_row) or per_row < 1 or (rows < 0).any():
        return None
    per_row = int(per_row)
    table = np.empty((widths[-1], per_row), dtype=np.int64)
    step_of = np.searchsorted(np.asarray(widths), rows, side="right")
    for s, (lo, hi) in enumerate(zip([0, *widths[:-1]], widths)):
        found = np.flatnonzero(step_of == s)
        if len(found) != (hi - lo) * per_row:
            return None
        table[lo:hi] = found.reshape(hi - lo, per_row)
    return table


def _arrangement(w, producers, full_classes, found, members, rows, local):
    """Every member's kept layer indices in the order of the width-w network: channel j of
    producer p there, the n-th of its class, is p's n-th kept channel of that class (ascending)."""
    slim_classes, slim_members = found
    assign = np.full((len(producers), w), -1, dtype=np.int64)  # slim channel -> full channel
    for k, p in enumerate(producers):
        kept = defaultdict(list)
        for i, cls in enumerate(full_classes[p]):
            if rows[k, i] < w:
                kept[cls].append(i)
        taken = Counter()
        for j, cls in enumerate(slim_classes[p]):
            assign[k, j] = kept[cls][taken[cls]]
            taken[cls] += 1
    arranged = {}
    for key, codes in members.items():
        slim = slim_members[key]
        layer = np.array([local[int(m)] for m in slim // _TAG], dtype=np.int64)
        target = (slim // _TAG) * _TAG + assign[layer, slim % _TAG]
        order = np.argsort(codes, kind="stable")
        at = np.searchsorted(codes[order], target)
        if len(np.unique(codes)) != len(codes) or not np.array_equal(codes[order][np.minimum(at, len(codes) - 1)],
                                                                      target):
            return {}  # a layer reading one channel twice, or a channel it lacks: not mapped
        arranged[key] = order[at]
    return arranged
