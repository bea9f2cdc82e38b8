"""RepNAS (Zhang et al., 2021; METHOD section 9): re-parameterisable branches, searched per layer
during fine-tuning and fused exactly into the convolution they extend.

Every eligible conv-BN pair of the (slim) model becomes a RepBlock for fine-tuning: the pair itself
plus candidate branches that are linear in the input, each ending in a batch norm of its own
(a diverse branch block):

    "1x1"       1x1 conv reading the input at the kernel's centre tap   -> BN
    "1x1-kxk"   1x1 conv -> BN -> kxk conv of the pair's geometry      -> BN
    "avg"       1x1 conv -> BN -> kxk average pool                      -> BN
    "identity"  the input at the centre tap (in == out channels)        -> BN
    "kxk"       a second conv of the pair's geometry                    -> BN

A kind is offered to a conv only where it fuses exactly (`unavailable`): no average pool with
dilation, no identity when the channel counts differ. The pairs are read from Torch-Pruning's
dependency graph (groups.build_graph): a conv whose output goes to one BatchNorm2d and nothing
else, both run once per forward; every other conv is left alone, with the reason in the report.

One-stage search (RepNAS): each candidate branch's output is multiplied by an architecture weight,
0 at first, trained with the weights by the fine-tuning optimiser; after the first `search_part` of
the fine-tuning steps the `branches` weights largest in magnitude over the whole network are kept
(the branch budget), the other branches removed, and fine-tuning goes on with the kept ones (their
weights train on). After fine-tuning every block is fused back into its conv and BN, which keep
their shapes: the fused model has the slim model's modules, state-dict keys, FLOPs, parameters and
ONNX operators.

Choices where the paper is silent (marked "(choice)" below): the architecture weight is a linear
factor starting at 0, so fine-tuning starts from the slim model's exact function while every weight
gets a gradient from the first step (a sigmoid gate would make every branch start at half
strength, a zero BN scale would leave the weights without a gradient); they learn at the
fine-tuning learning rate, like every other parameter; the 1x1 of "1x1-kxk" has as many output
channels as the conv has inputs; a 1x1 branch reads the kernel's centre tap (the upper-left one of
an even size), also under stride and padding, by slicing the padded input.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .batches import logits
from .errors import ConfigError, UnsupportedModelError
from .finetune import finetune
from .groups import build_graph
from .slim import max_rel_diff

log = logging.getLogger("compressor.reparam")

BRANCH_KINDS = ("1x1", "1x1-kxk", "avg", "identity", "kxk")
# the fused model must compute what the branched one does (float32 round-off only); a bug is far above
FUSION_TOLERANCE = 1e-4


@dataclass(frozen=True)
class RepnasOptions:
    """compress(reparam="repnas", reparam_options={...})."""
    branches: int | None = None  # branches kept over the whole network (None: 2 per eligible conv) (choice)
    kinds: tuple = BRANCH_KINDS  # the candidate kinds
    search_part: float = 0.25    # fraction of the fine-tuning steps before the selection (choice)

    def __post_init__(self):
        object.__setattr__(self, "kinds", tuple(self.kinds) if isinstance(self.kinds, (list, tuple)) else self.kinds)
        if self.branches is not None and (isinstance(self.branches, bool) or not isinstance(self.branches, int)
                                          or self.branches < 0):
            raise ConfigError(f"reparam option branches must be an integer >= 0 (the branches kept over the "
                              f"network) or None (2 per eligible conv), got {self.branches!r}")
        wrong = [k for k in self.kinds if k not in BRANCH_KINDS] if isinstance(self.kinds, tuple) else [self.kinds]
        if wrong or not self.kinds:
            raise ConfigError(f"reparam option kinds must be a non-empty list of {', '.join(map(repr, BRANCH_KINDS))}, "
                              f"got {self.kinds!r}")
        if isinstance(self.search_part, bool) or not isinstance(self.search_part, (int, float)) \
                or not 0 < self.search_part <= 1:
            raise ConfigError(f"reparam option search_part must be a fraction of the fine-tuning steps in (0, 1], "
                              f"got {self.search_part!r}")

    @classmethod
    def parse(cls, options=None) -> "RepnasOptions":
        """From a dict (or an instance); an unknown name is refused with the valid ones."""
        if isinstance(options, cls):
            return options
        options = dict(options or {})
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ConfigError(f"unknown reparam option{'s' if len(unknown) > 1 else ''} "
                              f"{', '.join(map(repr, unknown))}: valid options are {', '.join(map(repr, valid))}")
        return cls(**options)


# ---- geometry: where a branch reads its input --------------------------------------------------

@dataclass(frozen=True)
class Geometry:
    """The conv a block extends: every branch maps its input to the conv's output grid."""
    cin: int
    cout: int
    kernel: tuple
    stride: tuple
    padding: tuple
    dilation: tuple
    groups: int

    @classmethod
    def of(cls, conv: nn.Conv2d) -> "Geometry":
        return cls(conv.in_channels, conv.out_channels, tuple(conv.kernel_size), tuple(conv.stride),
                   tuple(conv.padding), tuple(conv.dilation), conv.groups)

    @property
    def tap(self) -> tuple:
        """The kernel position a 1x1 branch stands for: the centre (the upper-left one of an even size)."""
        return tuple((k - 1) // 2 for k in self.kernel)

    def centre(self, x):
        """What the conv's tap `self.tap` reads, on the conv's output grid: 1x1 and identity branches."""
        ph, pw = self.padding
        x = F.pad(x, (pw, pw, ph, ph))
        (h, w), (sh, sw), (dh, dw), (kh, kw) = x.shape[-2:], self.stride, self.dilation, self.kernel
        oh, ow = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
        th, tw = dh * self.tap[0], dw * self.tap[1]
        return x[..., th: th + sh * (oh - 1) + 1: sh, tw: tw + sw * (ow - 1) + 1: sw]

    def embed(self, k1x1):
        """A 1x1 kernel as the kxk kernel that computes the same at tap `self.tap`."""
        k = k1x1.new_zeros(*k1x1.shape[:2], *self.kernel)
        k[:, :, self.tap[0], self.tap[1]] = k1x1[:, :, 0, 0]
        return k


def unavailable(kind: str, geo: Geometry) -> str | None:
    """Why branch `kind` is not offered to a conv of geometry `geo` (None: it is)."""
    if kind == "1x1" and geo.kernel == (1, 1):
        return "the conv is 1x1 itself (that is the 'kxk' branch)"
    if kind == "avg" and geo.dilation != (1, 1):
        return "average pooling has no dilation"
    if kind == "avg" and geo.kernel == (1, 1):
        return "a 1x1 average is no average"
    if kind == "identity" and geo.cin != geo.cout:
        return f"the conv maps {geo.cin} channels to {geo.cout}"
    return None


def fold_bn(kernel, bias, bn):
    """(kernel, bias) of `bn` applied after a conv with (kernel, bias) (bias: a tensor or 0.0), `bn` in eval mode."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return kernel * scale.reshape(-1, 1, 1, 1), bn.bias + (bias - bn.running_mean) * scale


def _bn_offset(bn):
    """What `bn` (eval mode) outputs for a zero input: the value its padded border must hold."""
    return (bn.bias - bn.running_mean * bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach()


def _pad_like_input(u, bn, padding):
    """Pad the output `u` of a 1x1 conv and `bn` by `padding` with the value that conv and BN give a
    zero input: then the conv after it reads what it would read behind a zero-padded input, and the
    branch fuses exactly (DBB's BNAndPad)."""
    ph, pw = padding
    if not ph and not pw:
        return u
    value = _bn_offset(bn).reshape(1, -1, 1, 1)
    return F.pad(u - value, (pw, pw, ph, ph)) + value


def _conv1x1(cin, cout, groups):
    return nn.Conv2d(cin, cout, 1, groups=groups, bias=False)


def _kxk(geo, cin, padding):
    return nn.Conv2d(cin, geo.cout, geo.kernel, geo.stride, padding, geo.dilation, geo.groups, bias=False)


# ---- branches: forward and the (kernel, bias) each one equals ---------------------------------

class Branch(nn.Module):
    """One candidate branch: `body` then its own BN. `linear()` is the (kernel, bias) of the conv
    of the block's geometry that computes the same in eval mode."""

    def __init__(self, geo: Geometry):
        super().__init__()
        self.geo = geo
        self.bn = nn.BatchNorm2d(geo.cout)

    def forward(self, x):
        return self.bn(self.body(x))

    def linear(self):
        kernel, bias = self.body_linear()
        return fold_bn(kernel, bias, self.bn)


class OneByOne(Branch):
    def __init__(self, geo):
        super().__init__(geo)
        self.conv = _conv1x1(geo.cin, geo.cout, geo.groups)

    def body(self, x):
        return self.conv(self.geo.centre(x))

    def body_linear(self):
        return self.geo.embed(self.conv.weight), 0.0


class Identity(Branch):
    def body(self, x):
        return self.geo.centre(x)

    def body_linear(self):
        per_group = self.geo.cin // self.geo.groups
        eye = self.bn.running_mean.new_zeros(self.geo.cout, per_group, 1, 1)
        eye[torch.arange(self.geo.cout), torch.arange(self.geo.cout) % per_group] = 1
        return self.geo.embed(eye), 0.0


class Kxk(Branch):
    def __init__(self, geo):
        super().__init__(geo)
        self.conv = _kxk(geo, geo.cin, geo.padding)

    def body(self, x):
        return self.conv(x)

    def body_linear(self):
        return self.conv.weight, 0.0


class OneByOneKxk(Branch):
    """1x1 conv to `cin` channels (choice), BN, kxk conv: fused by composing the two kernels group by group."""

    def __init__(self, geo):
        super().__init__(geo)
        self.first = _conv1x1(geo.cin, geo.cin, geo.groups)
        self.mid = nn.BatchNorm2d(geo.cin)
        self.conv = _kxk(geo, geo.cin, 0)

    def body(self, x):
        return self.conv(_pad_like_input(self.mid(self.first(x)), self.mid, self.geo.padding))

    def body_linear(self):
        g = self.geo.groups
        k1, b1 = fold_bn(self.first.weight, 0.0, self.mid)   # (mid, cin/g, 1, 1), (mid,)
        k2 = self.conv.weight                                             # (cout, mid/g, kh, kw)
        k2 = k2.reshape(g, -1, *k2.shape[1:])
        k1 = k1.reshape(g, -1, k1.shape[1])                               # (g, mid/g, cin/g)
        kernel = torch.einsum("gomhw,gmi->goihw", k2, k1).flatten(0, 1)
        bias = torch.einsum("gom,gm->go", k2.sum((3, 4)), b1.reshape(g, -1)).flatten()
        return kernel, bias


class Average(Branch):
    """1x1 conv, BN, kxk average pool of the conv's stride and padding (no dilation)."""

    def __init__(self, geo):
        super().__init__(geo)
        self.first = _conv1x1(geo.cin, geo.cout, geo.groups)
        self.mid = nn.BatchNorm2d(geo.cout)

    def body(self, x):
        u = _pad_like_input(self.mid(self.first(x)), self.mid, self.geo.padding)
        return F.avg_pool2d(u, self.geo.kernel, self.geo.stride)

    def body_linear(self):
        k1, b1 = fold_bn(self.first.weight, 0.0, self.mid)
        area = self.geo.kernel[0] * self.geo.kernel[1]
        return k1.expand(-1, -1, *self.geo.kernel) / area, b1


BRANCHES = {"1x1": OneByOne, "1x1-kxk": OneByOneKxk, "avg": Average, "identity": Identity, "kxk": Kxk}
assert tuple(BRANCHES) == BRANCH_KINDS


# ---- the block ----------------------------------------------------------------------------------

class RepBlock(nn.Module):
    """A conv and its BN, plus candidate branches each scaled by an architecture weight; stands in
    the conv's place while the BN's place (`bn_name`) holds an nn.Identity. `fuse()` gives the pair
    back with the block's eval-mode function."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, kinds, bn_name: str = ""):
        super().__init__()
        self.conv, self.bn, self.bn_name = conv, bn, bn_name
        geo = Geometry.of(conv)
        wrong = {k: unavailable(k, geo) for k in kinds if unavailable(k, geo)}
        if wrong:
            raise ConfigError(f"branch kinds not offered to this conv: {wrong}")
        self.branches = nn.ModuleDict({k: BRANCHES[k](geo) for k in kinds}).to(conv.weight.device, conv.weight.dtype)
        # one architecture weight per candidate, multiplying its output: 0 at first, so the block
        # computes what the pair did while every weight gets a gradient from the first step (choice)
        self.index = {k: i for i, k in enumerate(kinds)}
        self.alpha = nn.Parameter(conv.weight.new_zeros(len(kinds)))

    def weights(self):
        """[(kind, its architecture weight)] of the branches the block holds."""
        return [(k, self.alpha[self.index[k]]) for k in self.branches]

    def forward(self, x):
        y = self.bn(self.conv(x))
        for (_, weight), branch in zip(self.weights(), self.branches.values()):
            y = y + weight * branch(x)
        return y

    def scores(self) -> dict:
        """{kind: architecture weight} of the branches the block holds."""
        return {k: float(w.detach()) for k, w in self.weights()}

    def keep(self, kinds):
        """End the search for this block: only the branches `kinds` stay (their weights train on)."""
        self.branches = nn.ModuleDict({k: self.branches[k] for k in kinds})

    @torch.no_grad()
    def linear(self):
        """(kernel, bias) of the one conv the block equals in eval mode."""
        bias = self.conv.bias if self.conv.bias is not None else 0.0
        kernel, bias = fold_bn(self.conv.weight, bias, self.bn)
        for (_, weight), branch in zip(self.weights(), self.branches.values()):
            k, b = branch.linear()
            kernel, bias = kernel + weight * k, bias + weight * b
        return kernel, bias

    @torch.no_grad()
    def fuse(self):
        """(conv, bn): the block's own modules, computing the block's eval-mode function: the conv
        holds the fused kernel, the BN the fused bias (mean 0, variance 1, scale sqrt(1 + eps)), so
        the fused model keeps the slim model's modules and shapes."""
        kernel, bias = self.linear()
        conv, bn = self.conv, self.bn
        conv.weight.copy_(kernel)
        if conv.bias is not None:
            conv.bias.zero_()
        bn.running_mean.zero_()
        bn.running_var.fill_(1.0)
        bn.weight.fill_(math.sqrt(1.0 + bn.eps))
        bn.bias.copy_(bias)
        return conv, bn


def _set(model, name, module):
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, module)


# ---- which convs get branches -------------------------------------------------------------------

def _calls(model, x):
    """{module: how many times one forward pass runs it}."""
    counts = {}
    handles = [m.register_forward_hook(lambda m, i, o: counts.__setitem__(m, counts.get(m, 0) + 1))
               for m in model.modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for h in handles:
            h.remove()
    return counts


def _why_not_pair(conv, graph, names, calls):
    """(the BN's name, None) when `conv` and the one BN after it can be a block, else (None, why not)."""
    if type(conv) is not nn.Conv2d:
        return None, f"{type(conv).__name__} is not a plain nn.Conv2d (it has its own forward)"
    if conv.padding_mode != "zeros":
        return None, f"padding_mode={conv.padding_mode!r}: only zero padding fuses exactly"
    if isinstance(conv.padding, str):
        return None, f"padding={conv.padding!r} given by name, not by size"
    if calls.get(conv, 0) != 1:
        return None, f"runs {calls.get(conv, 0)} times per forward pass, not once"
    node = graph.module2node.get(conv)
    users = node.outputs if node is not None else []
    bn = users[0].module if len(users) == 1 else None
    if type(bn) is not nn.BatchNorm2d:
        found = ", ".join(f"'{names[u.module]}' ({type(u.module).__name__})" if u.module in names
                          else f"the op {type(u.grad_fn).__name__}" for u in users)
        return None, f"its output goes to {found or 'no traced op'}, not to one nn.BatchNorm2d alone"
    if len(graph.module2node[bn].inputs) != 1 or calls.get(bn, 0) != 1:
        return None, f"its BN '{names[bn]}' also reads other inputs or runs more than once"
    if not (bn.affine and bn.track_running_stats):
        return None, f"its BN '{names[bn]}' has no affine parameters or running statistics to fuse into"
    return names[bn], None


def conv_bn_pairs(model: nn.Module, example_input: torch.Tensor):
    """([(conv name, BN name)], {conv name: why it gets no branches}) of every nn.Conv2d, from
    Torch-Pruning's graph of a copy of `model` traced on `example_input`."""
    traced = copy.deepcopy(model)
    calls = _calls(traced, example_input)
    graph = build_graph(traced, example_input)
    names = {m: n for n, m in traced.named_modules()}
    pairs, skipped = [], {}
    for name, module in traced.named_modules():
        if isinstance(module, nn.Conv2d):
            bn, why = _why_not_pair(module, graph, names, calls)
            if why:
                skipped[name] = why
            else:
                pairs.append((name, bn))
    return pairs, skipped


def add_branches(model: nn.Module, example_input: torch.Tensor, kinds=BRANCH_KINDS, output_fn=None) -> dict:
    """Turn every eligible conv-BN pair of `model` (in place) into a RepBlock with the branch kinds
    of `kinds` that fuse exactly for it. Returns the report: {"layers": {conv: {"bn", "offered"}},
    "skipped": {conv: reason}}. The branches' weights start at 0: the model computes what it did.
    `output_fn` picks the logits from an output that is not a tensor."""
    training = model.training
    with torch.no_grad():
        before = logits(model.eval()(example_input), output_fn)
    pairs, skipped = conv_bn_pairs(model, example_input)
    layers = {}
    for conv_name, bn_name in pairs:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        geo = Geometry.of(conv)
        offered = [k for k in kinds if unavailable(k, geo) is None]
        if not offered:
            skipped[conv_name] = "; ".join(f"{k}: {unavailable(k, geo)}" for k in kinds)
            continue
        _set(model, conv_name, RepBlock(conv, bn, offered, bn_name))
        _set(model, bn_name, nn.Identity())
        layers[conv_name] = {"bn": bn_name, "offered": offered}
    try:
        with torch.no_grad():
            after = logits(model.eval()(example_input), output_fn)
        diff = max_rel_diff(before, after)
    except Exception as e:  # the model's own forward can raise anything
        diff, error = float("inf"), e
    else:
        error = None
    if not diff <= FUSION_TOLERANCE:
        raise UnsupportedModelError(
            f"adding re-parameterisable branches changed {type(model).__name__}'s output (relative difference "
            f"{diff:.2g}{f'; {type(error).__name__}: {error}' if error else ''}): its forward uses a conv or BN "
            f"in a way the traced graph does not show. Compress without reparam (reparam=None).")
    model.train(training)
    log.info("RepNAS: %d conv-BN pairs get candidate branches, %d convs do not", len(layers), len(skipped))
    return {"layers": layers, "skipped": skipped}


def blocks(model: nn.Module) -> dict:
    """{name: RepBlock} of `model`."""
    return {n: m for n, m in model.named_modules() if isinstance(m, RepBlock)}


# ---- the search and the fusion ------------------------------------------------------------------

def select(model: nn.Module, budget: int) -> dict:
    """Keep the `budget` branches whose architecture weights are largest in magnitude over the whole
    network (ties: in model order) and remove the others. Returns {block name: {kind: weight}} of
    the candidates at the selection."""
    found = blocks(model)
    scores = {name: block.scores() for name, block in found.items()}
    ranked = sorted(((abs(w), name, kind) for name, s in scores.items() for kind, w in s.items()),
                    key=lambda t: -t[0])
    kept = {(name, kind) for _, name, kind in ranked[:budget]}
    for name, block in found.items():
        block.keep([k for k in block.branches if (name, k) in kept])
    return scores


def fuse(model: nn.Module) -> nn.Module:
    """Replace every RepBlock of `model` (in place) by its conv and BN holding the block's eval-mode
    function; returns `model`."""
    for name, block in blocks(model).items():
        conv, bn = block.fuse()
        _set(model, name, conv)
        _set(model, block.bn_name, bn)
    return model


def finetune_repnas(model: nn.Module, train_data, example_input, options=None, **finetune_options) -> dict:
    """Fine-tune `model` (in place) with RepNAS branches: add them, train them and their
    architecture weights for the first `search_part` of the steps, keep the budget's best branches,
    train on, fuse. The model that comes back has its own architecture and cost. `finetune_options`
    go to cz.finetune. Returns the report: budget, candidates, kept, the step of the selection, and
    per conv the BN, the kinds offered, their architecture weights at the selection and the kinds
    kept; the convs without branches and why."""
    options = RepnasOptions.parse(options)
    # the branches' initial weights come from their own draws (choice): fine-tuning then sees the
    # random numbers (augmentations, dropout) a run without branches sees, and the two compare paired
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(finetune_options.get("seed", 0))
        report = add_branches(model, example_input, options.kinds, finetune_options.get("output_fn"))
    layers = report["layers"]
    budget = 2 * len(layers) if options.branches is None else options.branches
    chosen = {}  # "scores" and "step" of the selection

    def on_step(step, steps):
        if not chosen and step >= math.ceil(options.search_part * steps):
            chosen.update(scores=select(model, budget), step=step)

    stats = finetune(model, train_data, on_step=on_step, **finetune_options)
    if not chosen:  # no fine-tuning step: every weight is 0, the first candidates win the ties
        chosen.update(scores=select(model, budget), step=0)
    for name, block in blocks(model).items():
        layers[name].update(weights=chosen["scores"][name], kept=list(block.branches))
    training = model.training
    model.eval()
    pick = finetune_options.get("output_fn")
    with torch.no_grad():
        branched = logits(model(example_input), pick)
        fuse(model)
        diff = max_rel_diff(branched, logits(model(example_input), pick))
    model.train(training)
    if not diff <= FUSION_TOLERANCE:
        raise RuntimeError(f"the fused model differs from the branched one by {diff:.3g} (relative): a fusion bug")
    kept = sum(len(v["kept"]) for v in layers.values())
    log.info("RepNAS: kept %d of %d candidate branches (budget %d) at step %d of %d; fused (relative difference %.1e)",
             kept, sum(len(v["offered"]) for v in layers.values()), budget, chosen["step"], stats["steps"], diff)
    return dict(method="repnas", budget=budget, candidates=sum(len(v["offered"]) for v in layers.values()),
                kept=kept, selected_at_step=chosen["step"], steps=stats["steps"], fusion_rel_diff=diff, **report)
