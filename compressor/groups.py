"""Channel groups: the width variables of a model, read from Torch-Pruning's dependency graph.

A group is a set of channel dimensions that must keep the same width after slimming (a conv's
output with its BN, everything summed with it by residual adds, the matching concat slices, the
input columns of the consumers). Each group is one width variable. We do not trace the graph
ourselves: Torch-Pruning does, and this module maps its groups to width variables and records,
for every member layer, which of its channel indices belong to which channel of the group.
"""
from __future__ import annotations

import contextlib
import signal
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch_pruning as tp
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from .errors import ConfigError, UnsupportedModelError
from .heads import raw_outputs
from .layers import LAYER_KINDS, frozen_bn_size, is_grn, layer_kind

_PASS_THROUGH_OPS = {
    tp.ops.OPTYPE.CONCAT, tp.ops.OPTYPE.SPLIT, tp.ops.OPTYPE.ELEMENTWISE, tp.ops.OPTYPE.RESHAPE,
    tp.ops.OPTYPE.SLICE, tp.ops.OPTYPE.UNBIND, tp.ops.OPTYPE.EXPAND, tp.ops.OPTYPE.OUTPUT,
}

# Ops whose split points are fixed channel counts in the model's code: a group passing through one
# cannot be slimmed (the forward would split the slim tensor at the original positions).
_SIZED_OPS = {tp.ops.OPTYPE.SPLIT, tp.ops.OPTYPE.UNBIND}


@dataclass(frozen=True)
class Member:
    """One layer touched by a group: `role` is "out" (it produces the group's channels, or
    normalises them) or "in" (it consumes them as input channels)."""
    module: str
    role: str
    kind: str


@dataclass
class ChannelGroup:
    """One width variable: `size` channels that are kept or removed together."""
    name: str
    size: int
    members: tuple
    # layer index table per (module, role): int array (size, multiplicity); row j lists the
    # layer's indices that carry channel j of the group (several when a flatten feeds a linear).
    index: dict = field(default_factory=dict, repr=False)
    # a shuffled stream's admissible widths and slim orders (compressor.shuffle.Stream), else None
    stream: object = field(default=None, repr=False)

    def __repr__(self):
        return f"ChannelGroup({self.name!r}, size={self.size}, members={len(self.members)})"


@contextlib.contextmanager
def innermost_module_on_error(model: nn.Module):
    """Yields a list that names the innermost module running when the body raised."""
    stack, culprit = [], []
    names = {m: n for n, m in model.named_modules()}

    def pre(module, args):
        stack.append(module)

    def post(module, args, out):
        if stack:
            stack.pop()

    handles = [m.register_forward_pre_hook(pre) for m in model.modules()]
    handles += [m.register_forward_hook(post) for m in model.modules()]
    try:
        yield culprit
    except Exception:
        if stack:
            culprit.append((names.get(stack[-1], "?"), type(stack[-1]).__name__))
        raise
    finally:
        for h in handles:
            h.remove()


def run_checked(model: nn.Module, example_input: torch.Tensor, what: str):
    """Forward pass that turns a failure into an error naming the module that failed."""
    culprit = []
    try:
        with innermost_module_on_error(model) as culprit:
            return model(example_input)
    except Exception as e:  # the user's forward can raise anything
        where = f" in module '{culprit[0][0]}' ({culprit[0][1]})" if culprit else ""
        raise ConfigError(
            f"{what}: the model's forward pass failed{where} on an example input of shape "
            f"{tuple(example_input.shape)}: {e}. Pass an example input the model accepts, "
            f"e.g. torch.randn(1, 3, 224, 224) for an ImageNet classifier."
        ) from e


class _TimeLimit(BaseException):
    """Raised inside whatever Torch-Pruning runs when analysis takes longer than its time limit; a
    BaseException, as KeyboardInterrupt, so that Torch-Pruning's `except Exception` cannot swallow it."""


@contextlib.contextmanager
def graph_time_limit(seconds, model):
    """Torch-Pruning's tracing and grouping may loop for hours on some graphs (rexnet_100,
    ecaresnet26t): after `seconds`, an UnsupportedModelError naming the module and op it was
    handling. Works in the main thread on POSIX (SIGALRM); elsewhere, or when an earlier alarm
    is already set (pytest-timeout's), there is no limit of ours (theirs stays and is restored)."""
    remaining = signal.getitimer(signal.ITIMER_REAL)[0] if hasattr(signal, "setitimer") else 0
    if not seconds or not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread() \
            or (remaining and remaining <= seconds):
        yield
        return

    def alarm(signum, frame):
        raise _TimeLimit()

    start = time.monotonic()
    previous = signal.signal(signal.SIGALRM, alarm)
    # repeating: a raise that lands in a gc callback or a __del__ is swallowed by Python ("exception
    # ignored"), so the alarm comes back every 50 ms until one reaches the analysis (every 0.5 s
    # let a swallowed first alarm miss an analysis that ended within the half second after it)
    signal.setitimer(signal.ITIMER_REAL, seconds, 0.05)
    try:
        yield
    except _TimeLimit as e:
        signal.setitimer(signal.ITIMER_REAL, 0)  # no second alarm while the error is built
        raise _unsupported(model, e, lambda module, op: (
            f"Torch-Pruning's analysis of its graph took more than {seconds:g} s (it was handling the op "
            f"{op} after module '{module}'; some graphs make it loop for hours). Pass time_limit= to "
            f"cz.analyze for a longer wait.")) from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if remaining:  # the earlier alarm, less the time spent here
            signal.setitimer(signal.ITIMER_REAL, max(remaining - (time.monotonic() - start), 1e-3))


def _unsupported(model, exc, why):
    """UnsupportedModelError for `exc` raised inside Torch-Pruning: why(module, op) says what failed."""
    module, op = _failing_op(exc, model)
    return UnsupportedModelError(f"{type(model).__name__} is not supported: {why(module, op)}", module=module, op=op)


def _failing_op(exc, model):
    """(module name, op) of the graph node Torch-Pruning was handling when it raised."""
    node, tb = None, exc.__traceback__
    while tb is not None:
        # the first Node-valued local of the innermost frame is the node being handled
        node = next((v for v in tb.tb_frame.f_locals.values() if isinstance(v, tp.dependency.Node)), node)
        tb = tb.tb_next
    if node is None:
        return type(model).__name__, "trace"
    return _failing_op_of_node(node, model)


def _failing_op_of_node(node, model):
    """(name of the nearest module feeding `node`, its op)."""
    names = {m: n for n, m in model.named_modules()}
    op = type(node.grad_fn).__name__ if node.grad_fn is not None else node.name
    seen, frontier = set(), [node]
    while frontier:  # nearest named module feeding the failing op
        n = frontier.pop(0)
        if n in seen:
            continue
        seen.add(n)
        if n.module in names:
            return names[n.module], op
        frontier.extend(n.inputs)
    return type(model).__name__, op


def build_graph(model: nn.Module, example_input: torch.Tensor, train_mode: bool = False) -> tp.DependencyGraph:
    """Torch-Pruning's dependency graph of `model` (which must be a private copy: tracing runs
    a forward pass; Torch-Pruning leaves it in eval mode). `train_mode` traces a train-mode forward."""
    def forward(module, x):  # a detector's raw head outputs: its post-processing is no channel graph
        return raw_outputs(module.train(train_mode), x)

    try:
        with torch.enable_grad(), _reshapes_checked(model):
            graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_input, forward_fn=forward,
                                                          verbose=False,
                                                          customized_pruners=_per_channel_pruners(model))
    except Exception as e:
        raise _unsupported(model, e, lambda module, op: (
            f"Torch-Pruning cannot map channels through the op {op} after module '{module}' "
            f"({type(e).__name__}: {e}). Channel shuffles, and reshapes or concatenations that mix the "
            f"channel dimension with others, cannot be slimmed.")) from e
    _check_splits(model, graph)
    return graph


class _PerChannel(tp.pruner.function.BasePruningFunc):
    """Torch-Pruning's view of a layer with one parameter set per channel that it does not know
    (torchvision's FrozenBatchNorm2d, timm's GlobalResponseNorm): batch norm's (one channel index in
    and out), so that the channels through it form one group; slimming is layers.py's."""

    def prune_out_channels(self, layer, idxs):
        keep = torch.from_numpy(np.setdiff1d(np.arange(frozen_bn_size(layer)), idxs))
        LAYER_KINDS[layer_kind(layer)].select(layer, "out", keep)
        return layer

    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer):
        return frozen_bn_size(layer)

    get_in_channels = get_out_channels


def _per_channel_pruners(model):
    """{class: _PerChannel()} for FrozenBatchNorm2d and the GlobalResponseNorm classes in `model`."""
    pruners = {FrozenBatchNorm2d: _PerChannel()}
    pruners.update({type(m): _PerChannel() for m in model.modules() if is_grn(m)})
    return pruners


@contextlib.contextmanager
def _reshapes_checked(model):
    """While Torch-Pruning builds its graph, give it each concat's real channel counts
    (_concat_sizes) and check each reshape it maps against the real shapes.
    Torch-Pruning 1.6 reads a reshape's input shape from an autograd field this torch no longer has
    (`_saved_self_sizes`), so it maps every reshape whose channel counts it infers as different as
    a flatten, with a stride from that inference: ECA's `view(B, 1, C)` around a Conv1d gets stride
    2048 and a group 2048 * 2048 indices (ecaresnet26t, gcresnet33ts: analysis took hours), and
    ShuffleNetV2's channel shuffle a stride of 0 (a ZeroDivisionError). Here a flatten mapping is
    kept only where the real shapes (autograd's saved input sizes and output metadata) are a flatten
    (N, C, *S) <-> (N, C * prod(S)) with that stride; a reshape that keeps (N, C) gets the identity;
    any other reshape gets no mapping and no outgoing dependencies, and the groups that reach it
    are frozen with the reason (_freeze_reason)."""
    from torch_pruning.dependency import constants, index_mapping
    original = index_mapping.update_reshape_index_mapping

    def touching(graph, node):
        return [dep for other in (*node.inputs, *node.outputs, node) for dep in other.dependencies
                if node in (dep.source, dep.target)]

    def update(graph, node):
        fn = node.grad_fn
        if not hasattr(fn, "_saved_self_sym_sizes") or not getattr(fn, "_input_metadata", None):
            return original(graph, node)
        before, after = tuple(fn._saved_self_sym_sizes), tuple(fn._input_metadata[0].shape)
        try:
            original(graph, node)
            mapped = {m._stride for dep in touching(graph, node) for m in dep.index_mapping
                      if isinstance(m, index_mapping._FlattenIndexMapping)}
        except ZeroDivisionError:  # it inferred 0 channels on one side: its stride would be 0
            mapped = {0}
        if not mapped or mapped == {_flatten_stride(before, after)}:
            return
        node.type = tp.ops.OPTYPE.ELEMENTWISE  # no mapping from update_index_mapping any more
        for dep in touching(graph, node):
            dep.index_mapping = [constants.INDEX_MAPPING_PLACEHOLDER] * 2
        if len(before) >= 2 and len(after) >= 2 and before[:2] == after[:2]:
            return  # (N, C, ...) -> (N, C, ...): channel i stays channel i, the identity mapping
        node.dependencies = []
        module, op = _failing_op_of_node(node, model)
        node.compressor_cut = _shuffle_reason(op, module, before, after) or (
            f"the reshape {op} after module '{module}' ({before} -> {after}) moves the "
            f"channels out of dimension 1, not the flatten with stride "
            f"{sorted(mapped)[0]} Torch-Pruning maps it as: these channels cannot be mapped")

    original_concat = index_mapping.update_concat_index_mapping

    def update_concat(graph, node):
        if node.module.concat_sizes is None:
            node.module.concat_sizes = _concat_sizes(node)
        return original_concat(graph, node)

    index_mapping.update_reshape_index_mapping = update
    index_mapping.update_concat_index_mapping = update_concat
    try:
        yield
    finally:
        index_mapping.update_reshape_index_mapping = original
        index_mapping.update_concat_index_mapping = original_concat


SHUFFLE_MARK = "as a channel shuffle does"


def _shuffle_reason(op, module, before, after):
    """The reason a channel shuffle's channels keep their width, where the reshape is one of the two
    of a shuffle, (N, C, *S) <-> (N, a, C / a, *S) (ShuffleNet's view, transpose, view), else None.
    analyze then tries compressor.shuffle on the groups frozen with it (SHUFFLE_MARK), and the
    reason stays only where that finds no mapping."""
    flat, split = (before, after) if len(after) > len(before) else (after, before)
    if len(split) != len(flat) + 1 or split[0] != flat[0] or split[1] * split[2] != flat[1] \
            or tuple(split[3:]) != tuple(flat[2:]) or min(split[1:3]) < 2:
        return None
    return (f"the reshape {op} after module '{module}' ({before} -> {after}) regroups these channels as "
            f"{split[1]} x {split[2]}, {SHUFFLE_MARK}: the shuffle interleaves the groups, and "
            f"a slim network running the model's own shuffle and chunks keeps the same function only with "
            f"channel sets that send every channel to the same layers, so these channels keep their width; "
            f"analyze(map_shuffles=True) (compress: map_shuffles=True, CLI --map-shuffles) maps such a "
            f"stream between convolutions (ShuffleNetV2's) as one width, where every channel reaches whole "
            f"layers")


def _concat_sizes(node):
    """The channel counts a channel concat joins, in the order of Torch-Pruning's input nodes, read
    from autograd (each input's output metadata); None where an input cannot be told apart (then
    Torch-Pruning infers them from the layers around, and leaves None where it cannot: dpn48b,
    cs3darknet_s)."""
    fn = node.grad_fn
    if getattr(fn, "_saved_dim", None) != 1:
        return None
    producers = [(parent, nr) for parent, nr in fn.next_functions if parent is not None]
    sizes = []
    for source in node.inputs:
        found = [(parent, nr) for parent, nr in producers if parent is source.grad_fn]
        if len(found) != 1 or not getattr(found[0][0], "_input_metadata", None):
            return None
        parent, nr = found[0]
        sizes.append(int(parent._input_metadata[nr].shape[1]))
    return sizes if len(sizes) == len(producers) else None


@contextlib.contextmanager
def _index_mappings_kept():
    """Torch-Pruning recomputes every index mapping of the graph (with a recursive shape inference
    per reshape) for each group it builds: on swin_t 3/4 of the analysis time. The graph does not
    change between groups, and build_graph computed (and checked) the mappings once: reuse them."""
    from torch_pruning.dependency import index_mapping
    original = index_mapping.update_index_mapping
    index_mapping.update_index_mapping = lambda graph: None
    try:
        yield
    finally:
        index_mapping.update_index_mapping = original


def _flatten_stride(before, after):
    """The stride of the flatten (N, C, *S) -> (N, C * prod(S)) or its inverse between these
    shapes, or None when the reshape is neither. C = 1 is no flatten of channels: ECA's
    (N, C) -> (N, 1, C) puts the channels in a sequence dimension."""
    flat, shaped = (after, before) if len(after) == 2 else (before, after)
    if len(flat) == 2 and len(shaped) >= 3 and shaped[1] > 1 and flat[1] == np.prod(shaped[1:]):
        return int(np.prod(shaped[2:]))
    return None


def _check_splits(model, graph):
    """Map every channel split's consumers to the pieces they read. Torch-Pruning maps the i-th
    consumer of a split to the i-th piece and reads the piece sizes of `x.split(n)` from autograd
    fields this torch no longer has: a piece read by two ops (CSPNet: a block's conv and its
    residual add) or an inferred size then shifts every index after it (cspresnet50: offsets
    [0, 256, 384, 512] for 256 channels split in two; res2net: 112 for the first of 8 pieces of 14).
    Here each consumer's piece is read from autograd (the output number it takes from the split)
    and its index mapping set from the true offsets; a consumer whose piece cannot be told is an
    UnsupportedModelError naming the module before the split."""
    from torch_pruning.dependency.index_mapping import _SplitIndexMapping
    node_fns = {n.grad_fn for n in graph.module2node.values() if n.grad_fn is not None}
    for node in list(graph.module2node.values()):
        fn = node.grad_fn
        if node.type != tp.ops.OPTYPE.SPLIT or getattr(fn, "_saved_dim", 1) != 1 or \
                not hasattr(fn, "_saved_self_sym_sizes"):
            continue
        total = int(fn._saved_self_sym_sizes[1])
        sizes = list(fn._saved_split_sizes) if hasattr(fn, "_saved_split_sizes") else \
            [min(fn._saved_split_size, total - start) for start in range(0, total, fn._saved_split_size)]
        offsets = [0, *np.cumsum(sizes).tolist()]
        for out in node.outputs:
            pieces = _pieces_read(out.grad_fn, fn, node_fns)
            if len(pieces) != 1:
                module, _ = _failing_op_of_node(node, model)
                raise UnsupportedModelError(
                    f"{type(model).__name__} is not supported: an op after the channel split after "
                    f"module '{module}' ({len(sizes)} pieces of {sizes} channels) reads "
                    f"{'no piece that can be told' if not pieces else f'pieces {sorted(pieces)} at once'}; "
                    f"Torch-Pruning cannot map it", module=module, op="split")
            piece = pieces.pop()
            for dep in node.dependencies:
                if dep.target is out:
                    dep.index_mapping[0] = _SplitIndexMapping(offset=offsets[piece:piece + 2], reverse=False)
            for dep in out.dependencies:
                if dep.target is node:
                    dep.index_mapping[0] = _SplitIndexMapping(offset=offsets[piece:piece + 2], reverse=True)
        node.module.split_sizes, node.module.offsets = sizes, offsets


def _pieces_read(fn, split_fn, node_fns, depth=8):
    """The output numbers of `split_fn` that autograd node `fn` reads, directly or through
    autograd nodes that are no graph node of Torch-Pruning's (views, copies)."""
    pieces = set()
    for parent, nr in (fn.next_functions if fn is not None else ()):
        if parent is split_fn:
            pieces.add(nr)
        elif parent is not None and parent not in node_fns and depth > 0:
            pieces |= _pieces_read(parent, split_fn, node_fns, depth - 1)
    return pieces


def _freeze_reason(group_items, graph, names, exclude_match):
    """Why a Torch-Pruning group cannot be a width variable, or None if it can."""
    consumers = 0
    for item in group_items:
        target = item.dep.target
        if hasattr(target, "compressor_cut"):
            return target.compressor_cut
        if target.type in _SIZED_OPS:
            return (f"a torch.chunk/split/unbind ({target.name}) divides these channels at fixed positions: "
                    f"slimming them would move the split point")
        if target.type in _PASS_THROUGH_OPS:
            continue
        module = target.module
        if isinstance(module, nn.Parameter):
            return f"an unwrapped parameter '{target.name}' carries these channels"
        name = names.get(module, target.name)
        kind = layer_kind(module)
        entry = LAYER_KINDS.get(kind)
        role = "out" if graph.is_out_channel_pruning_fn(item.dep.handler) else "in"
        if entry is None or not entry.maskable:
            return (f"module '{name}' ({kind}) touches these channels and cannot be masked "
                    f"exactly; only plain/depthwise convolutions, linear and batch-norm layers can")
        if role == "out" and exclude_match(name, module):
            return f"excluded by the user ('{name}')"
        if role == "in" and entry.in_dim is not None:  # it reads them as inputs of its own
            consumers += 1
    if consumers == 0:
        return "these channels reach the model output (the classifier output is never pruned)"
    return None


def _index_table(root_of_idx, size):
    """int array (size, multiplicity): the layer indices carrying each group channel."""
    per_root = [[] for _ in range(size)]
    for idx, root in sorted(root_of_idx.items()):
        per_root[root].append(idx)
    counts = {len(r) for r in per_root}
    if len(counts) != 1 or 0 in counts:
        return None
    return np.array(per_root, dtype=np.int64)


def find_groups(model: nn.Module, graph: tp.DependencyGraph, exclude=()):
    """Return (groups, frozen): width variables, and {group name: reason} for those kept fixed."""
    names = {m: n for n, m in model.named_modules()}
    excluded_names = {e for e in exclude if isinstance(e, str)}
    excluded_types = tuple(e for e in exclude if isinstance(e, type))
    unknown = excluded_names - set(names.values())
    if unknown:
        raise ConfigError(f"exclude names modules that are not in the model: {sorted(unknown)}")

    def exclude_match(name, module):
        return name in excluded_names or (excluded_types and isinstance(module, excluded_types))

    groups, frozen = [], {}
    with _index_mappings_kept():
        tp_groups = list(graph.get_all_groups(root_module_types=(nn.Conv1d, nn.Conv2d, nn.Linear)))
    for tp_group in tp_groups:
        root = tp_group[0].dep.target.module
        gname = names[root]
        size = len(tp_group[0].idxs)
        reason = _freeze_reason(tp_group.items, graph, names, exclude_match)
        if reason is not None:
            frozen[gname] = reason
            continue
        # Collect, per (module, role), the layer indices and the group channel each one carries.
        collected = {}
        for item in tp_group.items:
            target = item.dep.target
            if target.type in _PASS_THROUGH_OPS:
                continue
            module = target.module
            role = "out" if graph.is_out_channel_pruning_fn(item.dep.handler) else "in"
            kind = layer_kind(module)
            if LAYER_KINDS[kind].in_dim is None:
                role = "out"  # its input and output channels are the same channels
            entry = collected.setdefault((names[module], role, kind), {})
            for idx, root_idx in zip(item.idxs, item.root_idxs):
                entry.setdefault(idx, root_idx)
        index, members = {}, []
        for (mname, role, kind), entry in collected.items():
            table = _index_table(entry, size)
            if table is None:
                reason = f"module '{mname}' maps these channels unevenly"
                break
            width = LAYER_KINDS[kind].size(model.get_submodule(mname), role)
            if table.max() >= width:  # our own check of Torch-Pruning's index mapping
                ops = sorted({item.dep.target.name for item in tp_group.items
                              if item.dep.target.type in _PASS_THROUGH_OPS}) or ["?"]
                raise UnsupportedModelError(
                    f"{type(model).__name__} is not supported: Torch-Pruning maps channels of group '{gname}' "
                    f"to index {int(table.max())} of module '{mname}', which has {width} "
                    f"{'output' if role == 'out' else 'input'} channels, through the op(s) {', '.join(ops)}",
                    module=mname, op=ops[-1])
            index[(mname, role)] = table
            members.append(Member(mname, role, kind))
        if reason is None:
            size, index, reason = _per_group_slots(model, size, index)
        if reason is not None:
            frozen[gname] = reason
            continue
        groups.append(ChannelGroup(gname, size, tuple(members), index))
    return groups, frozen


def _per_group_slots(model, size, index):
    """(size, index, None), or (.., .., reason) where the group cannot be slimmed. A group through
    grouped convolutions becomes a group of their channel offsets: its channel j stands for offset j
    of every convolution group (one index per group in the convs, the channels those carry in the
    other layers), so any width keeps the same offsets in every group and `groups` stays valid.
    Choice: the same offsets in every group, not whole groups removed (RegNet and ResNeXt fix the
    channels per group and vary the number of groups; here a width is the channels per group)."""
    grouped = [(name, role) for name, role in index
               if layer_kind(model.get_submodule(name)) == "grouped_conv"]
    if not grouped:
        return size, index, None
    offsets = group_of = None
    for name, role in grouped:
        module, table = model.get_submodule(name), index[(name, role)]
        channels = LAYER_KINDS["grouped_conv"].size(module, role)
        per = channels // module.groups
        if table.shape[1] != 1 or len(table) != channels:  # e.g. one input of a concat feeding the conv
            return size, index, (f"these channels are part of the {'inputs' if role == 'in' else 'outputs'} of the "
                                 f"grouped convolution '{name}': only a group that holds all of them can keep the "
                                 f"same channels in every conv group")
        if offsets is not None and not np.array_equal(table[:, 0] % per, offsets):
            return size, index, (f"the grouped convolution '{name}' reads these channels in another grouping "
                                 f"than the other layers of the group: they cannot be kept group-consistently")
        if offsets is None:
            offsets, group_of, slots = table[:, 0] % per, table[:, 0] // per, per
    roots = np.lexsort((group_of, offsets)).reshape(slots, -1)  # row j: the channels at offset j, by group
    return slots, {key: table[roots].reshape(slots, -1) for key, table in index.items()}, None
