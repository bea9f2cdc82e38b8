"""masked_conv2d: the implementations agree, and the channel windows mean what they say."""
import os
import random

import pytest
import torch
import torch.nn.functional as F

from compressor.kernels import masked_conv2d
from compressor.kernels.masked_conv import _MaskedConvCuda

# Error relative to the largest magnitude of the expected tensor. Low precision: one rounding of the
# result (fp16 eps 9.8e-4, bf16 eps 7.8e-3) plus accumulation-order differences.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}

cuda = pytest.mark.gpu  # the CUDA kernel tests need a GPU (conftest.py skips them without one)


def rel_err(actual, expected):
    return float((actual.double() - expected.double()).abs().max() / expected.double().abs().max().clamp_min(1e-30))


def random_case(seed, kind, min_channels=1):
    """A random layer: kind is 'dense' (groups=1), 'depthwise' or 'grouped' (1 < groups < C_in)."""
    rng = random.Random(seed)
    groups = {"dense": 1, "depthwise": rng.randint(max(1, min_channels), 10), "grouped": rng.choice([2, 3])}[kind]
    c_in = groups if kind == "depthwise" else groups * rng.randint(min_channels, 4)
    c_out = c_in if kind == "depthwise" else groups * rng.randint(min_channels, 4)
    kh, kw = rng.randint(1, 3), rng.randint(1, 3)
    stride, padding, dilation = ((rng.randint(lo, hi), rng.randint(lo, hi)) for lo, hi in ((1, 3), (0, 2), (1, 2)))
    h = rng.randint(max(1, dilation[0] * (kh - 1) + 1 - 2 * padding[0]), 10)
    w = rng.randint(max(1, dilation[1] * (kw - 1) + 1 - 2 * padding[1]), 10)
    in_len = rng.randint(1, c_in)
    in_window = (rng.randint(0, c_in - in_len), in_len)
    if kind == "depthwise":
        out_window = in_window
    else:
        out_len = rng.randint(1, c_out)
        out_window = (rng.randint(0, c_out - out_len), out_len)
    gen = torch.Generator().manual_seed(seed)
    return dict(
        x=torch.randn(rng.randint(1, 3), c_in, h, w, generator=gen),
        weight=torch.randn(c_out, c_in // groups, kh, kw, generator=gen),
        bias=torch.randn(c_out, generator=gen) if rng.random() < 0.7 else None,
        in_window=in_window, out_window=out_window, stride=stride, padding=padding, dilation=dilation,
        groups=groups,
    )


def run(case, impl, dtype=torch.float32, device="cpu", grad_dtype=None):
    """Output and gradients of x, weight and bias (zeros for a bias-free layer) for a fixed output
    gradient, whose values are rounded to grad_dtype (default: dtype). `impl` is a masked_conv2d
    impl name, or a compiled kernel extension (the CPU emulator) run through the CUDA path's
    autograd Function."""
    x = case["x"].to(device, dtype).requires_grad_()
    weight = case["weight"].to(device, dtype).requires_grad_()
    bias = None if case["bias"] is None else case["bias"].to(device, dtype).requires_grad_()
    params = {k: v for k, v in case.items() if k not in ("x", "weight", "bias")}
    if isinstance(impl, str):
        y = masked_conv2d(x, weight, bias, impl=impl, **params)
    else:
        y = _MaskedConvCuda.apply(x, weight, bias, params["in_window"], params["out_window"], params["stride"],
                                  params["padding"], params["dilation"], params["groups"] != 1, impl)
    grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(grad_dtype or dtype)
    grad_out = grad_out.to(device, dtype)
    inputs = (x, weight) if bias is None else (x, weight, bias)
    grads = torch.autograd.grad(y, inputs, grad_out, materialize_grads=True)
    grad_b = grads[2] if bias is not None else torch.zeros(case["weight"].shape[0], device=device)
    return y.detach(), grads[0], grads[1], grad_b


CASES = [(seed, kind) for kind in ("dense", "depthwise") for seed in range(10)] + \
        [(seed, "grouped") for seed in range(6)]


@pytest.mark.parametrize("seed,kind", CASES)
def test_sliced_matches_reference(seed, kind):
    case = random_case(seed, kind)
    expected = run(case, "reference")
    actual = run(case, "sliced")
    for name, a, e in zip(("output", "grad x", "grad weight", "grad bias"), actual, expected):
        assert a.shape == e.shape
        assert rel_err(a, e) <= TOL[torch.float32], name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("impl", ["reference", "sliced"])
@pytest.mark.parametrize("seed,kind", [(0, "dense"), (2, "depthwise")])
def test_low_precision_on_cpu(seed, kind, impl, dtype):
    case = random_case(seed, kind)
    rounded = {k: v.to(dtype).double() if torch.is_tensor(v) else v for k, v in case.items()}
    expected = run(rounded, "reference", dtype=torch.float64, grad_dtype=dtype)
    actual = run(case, impl, dtype=dtype)
    assert actual[0].dtype == dtype
    for name, a, e in zip(("output", "grad x", "grad weight"), actual, expected):
        assert rel_err(a, e) <= TOL[dtype], name


@pytest.mark.parametrize("impl", ["reference", "sliced"])
@pytest.mark.parametrize("kind", ["dense", "depthwise", "grouped"])
def test_zero_outside_windows(impl, kind):
    case = random_case(7, kind, min_channels=2)
    case["in_window"], case["out_window"] = (1, case["x"].shape[1] - 1), (1, case["weight"].shape[0] - 1)
    if kind == "depthwise":
        case["out_window"] = case["in_window"]
    (i0, il), (o0, ol) = case["in_window"], case["out_window"]
    y, grad_x, grad_w, grad_b = run(case, impl)
    outside_out = torch.ones(y.shape[1], dtype=torch.bool)
    outside_out[o0:o0 + ol] = False
    assert y[:, outside_out].eq(0).all() and y[:, ~outside_out].ne(0).any()
    assert grad_b[outside_out].eq(0).all()
    assert grad_x[:, :i0].eq(0).all() and grad_x[:, i0 + il:].eq(0).all()
    assert grad_w[outside_out].eq(0).all()
    if kind == "dense":
        assert grad_w[:, :i0].eq(0).all() and grad_w[:, i0 + il:].eq(0).all()


@pytest.mark.parametrize("impl", ["reference", "sliced"])
@pytest.mark.parametrize("kind", ["dense", "depthwise", "grouped"])
def test_inactive_input_channels_do_not_matter(impl, kind):
    case = random_case(11, kind, min_channels=2)
    case["in_window"] = (1, case["x"].shape[1] - 1)
    if kind == "depthwise":
        case["out_window"] = case["in_window"]
    y = run(case, impl)[0]
    case["x"] = case["x"].clone()
    case["x"][:, 0] = float("nan")
    y_changed = run(case, impl)[0]
    assert torch.equal(y, y_changed)


@pytest.mark.parametrize("impl", ["reference", "sliced", "auto"])
def test_full_windows_equal_conv2d(impl):
    case = random_case(5, "dense")
    c_in, c_out = case["x"].shape[1], case["weight"].shape[0]
    y = masked_conv2d(case["x"], case["weight"], case["bias"], (0, c_in), (0, c_out), case["stride"],
                      case["padding"], case["dilation"], impl=impl)
    expected = F.conv2d(case["x"], case["weight"], case["bias"], case["stride"], case["padding"], case["dilation"])
    assert rel_err(y, expected) <= TOL[torch.float32]


def test_auto_on_cpu_is_sliced():
    case = random_case(4, "dense")
    assert all(torch.equal(a, s) for a, s in zip(run(case, "auto"), run(case, "sliced")))


def _call(**overrides):
    args = dict(x=torch.randn(2, 8, 6, 6), weight=torch.randn(4, 8, 3, 3), bias=torch.randn(4),
                in_window=(0, 8), out_window=(0, 4))
    args.update(overrides)
    return masked_conv2d(**args)


@pytest.mark.parametrize("overrides,message", [
    (dict(impl="fast"), "impl must be one of 'auto', 'reference', 'sliced', 'cuda'"),
    (dict(in_window=(4, 5)), r"in_window \(4, 5\) is out of range for 8 channels"),
    (dict(in_window=(-1, 2)), "in_window"),
    (dict(out_window=(0, 0)), r"out_window \(0, 0\) is out of range for 4 channels"),
    (dict(out_window=(0, 2, 1)), r"out_window must be a \(start, length\) pair"),
    (dict(weight=torch.randn(4, 6, 3, 3)), "weight shape"),
    (dict(weight=torch.randn(4, 8, 3)), "4-D"),
    (dict(bias=torch.randn(5)), "bias shape"),
    (dict(groups=3), "groups=3"),
    (dict(stride=0), "stride"),
    (dict(padding=(1, -1)), "padding"),
    (dict(impl="cuda"), "needs CUDA tensors"),
])
def test_argument_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        _call(**overrides)


def test_build_names_missing_toolkit(monkeypatch, tmp_path):
    from compressor.kernels.build import BuildError, build

    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    with pytest.raises(BuildError, match="nvcc|CPU-only"):
        build()


# ---- the CUDA kernels' own source, run by the CPU emulator (csrc/masked_conv_emulated.cpp): one host
# thread per CUDA thread, so CI checks the kernels' indexing, tiles and reductions without a GPU.

@pytest.fixture(scope="module")
def emulated():
    from compressor.kernels.build import build_emulated

    return build_emulated()  # about a minute the first time, then cached


def assert_matches_reference(case, impl, dtype, device="cpu"):
    """`impl` (a name or the emulated extension) against the float64 reference on inputs rounded to dtype."""
    rounded = {k: v.to(dtype).double() if torch.is_tensor(v) else v for k, v in case.items()}
    expected = run(rounded, "reference", dtype=torch.float64, device=device, grad_dtype=dtype)
    actual = run(case, impl, dtype=dtype, device=device)
    assert actual[0].dtype == dtype
    for name, a, e in zip(("output", "grad x", "grad weight", "grad bias"), actual, expected):
        assert rel_err(a, e) <= TOL[dtype], name


@pytest.mark.parametrize("seed,kind", [(s, k) for k in ("dense", "depthwise") for s in range(12)])
def test_emulated_kernels_match_reference(emulated, seed, kind):
    assert_matches_reference(random_case(seed, kind), emulated, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("seed,kind", [(s, k) for k in ("dense", "depthwise") for s in range(3)])
def test_emulated_kernels_low_precision(emulated, seed, kind, dtype):
    assert_matches_reference(random_case(seed, kind), emulated, dtype)


LAYERS = {  # name: c_in, c_out, kernel, stride, padding, in_window, out_window, depthwise
    "dense 3x3": (24, 20, 3, 1, 1, (5, 17), (2, 15), False),
    "dense 7x7 stride 2": (5, 9, 7, 2, 3, (1, 3), (0, 9), False),  # 49 taps: six passes of the tap tile
    "depthwise 3x3 stride 2": (6, 6, 3, 2, 1, (1, 4), (1, 4), True),
    "depthwise 5x5": (10, 10, 5, 1, 2, (3, 6), (3, 6), True),
}


@pytest.mark.parametrize("layer", LAYERS)
def test_emulated_kernels_on_a_layer_that_fills_the_blocks(emulated, layer):
    """Several blocks with a partial last one, a partial channel tile, every thread of the weight
    gradient's reduction holding data, several tap tiles, the batch split across blocks."""
    c_in, c_out, k, stride, padding, in_window, out_window, depthwise = LAYERS[layer]
    gen = torch.Generator().manual_seed(3)
    case = dict(x=torch.randn(6, c_in, 12, 12, generator=gen),
                weight=torch.randn(c_out, 1 if depthwise else c_in, k, k, generator=gen),
                bias=torch.randn(c_out, generator=gen), in_window=in_window, out_window=out_window,
                stride=(stride, stride), padding=(padding, padding), dilation=(1, 1), groups=c_in if depthwise else 1)
    assert_matches_reference(case, emulated, torch.float32)


def test_emulated_kernels_check_their_arguments(emulated):
    x, weight = torch.randn(1, 4, 5, 5), torch.randn(3, 4, 3, 3)
    with pytest.raises(RuntimeError, match=r"in_window \(2, 3\) is out of range for 4 channels"):
        emulated.forward(x, weight, None, [2, 3], [0, 3], [1, 1], [1, 1], [1, 1], False)
    with pytest.raises(RuntimeError, match="grad_out has shape"):
        emulated.grad_weight(torch.randn(1, 3, 4, 4), x, weight, [0, 4], [0, 3], [1, 1], [1, 1], [1, 1], False)


@pytest.mark.skipif(os.environ.get("COMPRESSOR_BUILD_KERNELS") != "1",
                    reason="compiles the CUDA extension (minutes): set COMPRESSOR_BUILD_KERNELS=1")
def test_extension_builds():
    from compressor.kernels.build import build

    module = build()
    assert all(hasattr(module, name) for name in ("forward", "grad_input", "grad_weight"))


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("seed,kind", [(s, k) for k in ("dense", "depthwise") for s in range(6)])
def test_cuda_matches_reference(seed, kind, dtype):
    assert_matches_reference(random_case(seed, kind), "cuda", dtype, device="cuda")


@cuda
def test_cuda_large_layer_matches_reference():
    """A ResNet-sized layer: many blocks, a partial channel tile, the batch split in the weight gradient."""
    gen = torch.Generator().manual_seed(0)
    case = dict(x=torch.randn(16, 64, 16, 16, generator=gen), weight=torch.randn(64, 64, 3, 3, generator=gen),
                bias=torch.randn(64, generator=gen), in_window=(32, 8), out_window=(0, 30), stride=(1, 1),
                padding=(1, 1), dilation=(1, 1), groups=1)
    expected = run({k: v.double() if torch.is_tensor(v) else v for k, v in case.items()}, "reference",
                   dtype=torch.float64, device="cuda")
    for a, e in zip(run(case, "cuda", device="cuda"), expected):
        assert rel_err(a, e) <= TOL[torch.float32]


@cuda
def test_cuda_uncovered_cases_fall_back_to_sliced(caplog):
    case = random_case(0, "grouped")
    with caplog.at_level("WARNING", logger="compressor.kernels"):
        actual = run(case, "cuda", device="cuda")
    expected = run(case, "sliced")
    assert "groups=" in caplog.text
    for a, e in zip(actual, expected):
        assert rel_err(a.cpu(), e) <= TOL[torch.float32]
