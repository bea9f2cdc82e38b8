"""Exact FLOPs and parameter counts of any width configuration, without a forward pass.

Convention: one multiply-add is 2 FLOPs and only convolutions and matrix products count, exactly as
`torch.utils.flop_counter.FlopCounterMode` counts them (biases, norms, activations and pooling are
free). FLOPs are for one sample at the example input's spatial size.

Every conv/linear/batch-norm dimension is an affine function of the group widths:
    dim = fixed + sum_g multiplicity[g] * k_g
so the cost of a configuration is a handful of small dense matrix products. Anything the formula
does not model (attention matmuls, LayerNorm weights, ...) only ever touches frozen groups and is
measured once on the full model as a constant.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .layers import kind_of


def measure_flops(model: nn.Module, example_input: torch.Tensor) -> int:
    """FLOPs of one forward pass of `example_input` as FlopCounterMode counts them."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(example_input)
    return int(counter.get_total_flops())


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class _AffineDims:
    """Rows of (fixed, per-group multiplicity) describing layer dimensions."""

    def __init__(self, n_groups):
        self.fixed, self.rows, self.n_groups = [], [], n_groups

    def add(self, total, coverage):
        row = np.zeros(self.n_groups)
        for g, multiplicity, size in coverage:
            row[g] += multiplicity
            total -= multiplicity * size
        self.fixed.append(total)
        self.rows.append(row)

    def add_constant(self, value):
        self.add(value, ())

    def arrays(self):
        """(fixed (L,), multiplicities (G, L)): transposed so a cost is k @ matrix."""
        rows = np.array(self.rows).reshape(-1, self.n_groups)
        return np.array(self.fixed, dtype=np.float64), np.ascontiguousarray(rows.T)


class CostModel:
    """FLOPs/params as functions of the vector of kept channels per group."""

    def __init__(self, model: nn.Module, groups, example_input: torch.Tensor):
        sample = example_input[:1]
        coverage = {}  # (module name, role) -> [(group index, multiplicity, group size)]
        for g, group in enumerate(groups):
            for (mname, role), table in group.index.items():
                coverage.setdefault((mname, role), []).append((g, table.shape[1], group.size))

        calls = []  # (name, module, kind, output elements per channel) for each conv/linear call
        handles = []
        for name, module in model.named_modules():
            kind = kind_of(module)
            if kind is not None and kind.flops:
                # output elements per output channel of the one-sample forward: H*W for a conv,
                # the number of rows (tokens) for a linear. The whole output, not o[0]: a model may
                # fold the spatial grid into the batch dimension (MobileViT's transformer runs on
                # (patch_area, patches, dim) for one image), and o[0] would be one patch position
                handles.append(module.register_forward_hook(lambda m, i, o, name=name, kind=kind: calls.append(
                    (name, m, kind, o.numel() // kind.size(m, "out")))))
        try:
            with torch.no_grad():
                model(sample)
        finally:
            for h in handles:
                h.remove()

        n = len(groups)
        f_out, f_in, f_coef = _AffineDims(n), _AffineDims(n), []
        for name, module, kind, per_channel in calls:
            self._add_dims(kind, module, name, coverage, f_out, f_in)
            f_coef.append(2 * per_channel * kind.cost(module).per_pair)

        p_out, p_in, p_coef, p_lin = _AffineDims(n), _AffineDims(n), [], []
        for name, module in model.named_modules():
            kind = kind_of(module)
            if kind is not None:
                self._add_dims(kind, module, name, coverage, p_out, p_in)
                cost = kind.cost(module)
                p_coef.append(cost.per_pair)
                p_lin.append(cost.per_channel)

        # the multiplicity matrices are stored transposed, (G, L), for k @ M
        self.flop_out, self.flop_out_m = f_out.arrays()
        self.flop_in, self.flop_in_m = f_in.arrays()
        self.flop_coef = np.array(f_coef, dtype=np.float64)
        self.param_out, self.param_out_m = p_out.arrays()
        self.param_in, self.param_in_m = p_in.arrays()
        self.param_coef = np.array(p_coef, dtype=np.float64)
        self.param_lin = np.array(p_lin, dtype=np.float64)

        full = np.array([group.size for group in groups], dtype=np.float64)
        self.flops_constant = measure_flops(model, sample) - self._flops(full)
        self.params_constant = count_params(model) - self._params(full)

    @staticmethod
    def _add_dims(kind, module, name, coverage, out_dims, in_dims):
        out_dims.add(kind.size(module, "out"), coverage.get((name, "out"), ()))
        cost = kind.cost(module)
        if cost.fixed_in is not None:  # a depthwise filter reads one channel whatever the width
            in_dims.add_constant(cost.fixed_in)
        else:  # a grouped conv's filter reads its group's share of the input channels
            share = cost.in_groups
            in_dims.add(kind.size(module, "in") / share,
                        [(g, multiplicity / share, size) for g, multiplicity, size in coverage.get((name, "in"), ())])

    def _flops(self, k):
        out = self.flop_out + k @ self.flop_out_m
        inn = self.flop_in + k @ self.flop_in_m
        return (out * inn) @ self.flop_coef

    def _params(self, k):
        out = self.param_out + k @ self.param_out_m
        inn = self.param_in + k @ self.param_in_m
        return (out * inn) @ self.param_coef + out @ self.param_lin

    def flops(self, k):
        """FLOPs of one sample for kept-channel vector(s) `k` (shape (G,) or (B, G))."""
        return self._flops(k.astype(np.float64)) + self.flops_constant

    def params(self, k):
        return self._params(k.astype(np.float64)) + self.params_constant

    def differentiable(self, metric: str, kept: torch.Tensor, var: torch.Tensor | None = None) -> torch.Tensor:
        """FLOPs ("flops") or parameters ("params") of one sample as a torch function of the kept
        channels per group `kept` (G,), differentiable, exact for real-valued counts too (DAGGER's sums
        of gates). With `var` (G,), the variances of independent random counts whose means are `kept`:
        the exact expectation, since each layer's cost is bilinear in its output and input widths,
        E[out * in] = E[out] E[in] + sum_g Mo[l, g] Mi[l, g] Var(k_g)."""
        prefix = {"flops": "flop", "params": "param"}[metric]
        t = lambda a: torch.as_tensor(a, dtype=kept.dtype, device=kept.device)  # noqa: E731
        mo, mi = t(getattr(self, prefix + "_out_m")), t(getattr(self, prefix + "_in_m"))  # (G, L)
        out = t(getattr(self, prefix + "_out")) + kept @ mo
        inn = t(getattr(self, prefix + "_in")) + kept @ mi
        product = out * inn if var is None else out * inn + var @ (mo * mi)
        total = product @ t(getattr(self, prefix + "_coef")) + getattr(self, metric + "_constant")
        return total + out @ t(self.param_lin) if metric == "params" else total
