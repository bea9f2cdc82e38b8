"""Per-layer time of masked_conv2d's implementations against a plain conv on pre-sliced tensors.

Forward + backward (gradients of x, weight and bias) of representative layers at 50 % width (the
left path: channels [0, C/2) in and out), median over repetitions. The pre-sliced conv is what a
physically slimmed subnet costs (cuDNN on a GPU); a masked conv can at best match it.

    python benchmarks/kernels.py [--reps N] [--warmup N] [--dtype float32|float16|bfloat16]

Writes benchmarks/results/kernels.json (machine, versions, command, timings) and prints a table.
"""
import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from common import machine_info
from compressor.files import write_text_atomic
from compressor.kernels import masked_conv2d

WIDTH = 0.5
# name, batch, C_in, C_out, H (= W), kernel, stride, depthwise
LAYERS = [
    ("resnet56 3x3 16ch 32x32", 128, 16, 16, 32, 3, 1, False),
    ("resnet56 3x3 32ch 16x16", 128, 32, 32, 16, 3, 1, False),
    ("resnet56 3x3 64ch 8x8", 128, 64, 64, 8, 3, 1, False),
    ("mbv2 pw 24->144 56x56", 64, 24, 144, 56, 1, 1, False),
    ("mbv2 dw 3x3 144ch 56x56", 64, 144, 144, 56, 3, 1, True),
    ("mbv2 pw 144->24 56x56", 64, 144, 24, 56, 1, 1, False),
    ("mbv2 dw 3x3 s2 96ch 112x112", 64, 96, 96, 112, 3, 2, True),
]
IMPLS = ("pre-sliced conv", "reference", "sliced", "cuda")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def cuda_unavailable_reason(device):
    """None when impl='cuda' can run here, else why not (recorded instead of a time)."""
    if device.type != "cuda":
        return "not available: no GPU"
    from compressor.kernels.build import BuildError, build

    try:
        build()  # compile before timing, not inside the first repetition
    except BuildError as error:
        return f"not available: {error}"
    return None


def layer_tensors(batch, c_in, c_out, size, kernel, depthwise, device, dtype):
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch, c_in, size, size, generator=gen)
    weight = torch.randn(c_out, 1 if depthwise else c_in, kernel, kernel, generator=gen) / kernel
    bias = torch.randn(c_out, generator=gen)
    return [t.to(device, dtype) for t in (x, weight, bias)]


def make_step(impl, x, weight, bias, kernel, stride, depthwise):
    """A zero-argument forward + backward of one implementation, with its inputs prepared outside it."""
    c_in, c_out = x.shape[1], weight.shape[0]
    in_len, out_len = int(c_in * WIDTH), int(c_out * WIDTH)
    padding = kernel // 2
    if impl == "pre-sliced conv":
        groups = in_len if depthwise else 1
        inputs = [x[:, :in_len].contiguous(), weight[:out_len, :(1 if depthwise else in_len)].contiguous(),
                  bias[:out_len].contiguous()]
        inputs = [t.requires_grad_() for t in inputs]
        forward = lambda: F.conv2d(*inputs, stride, padding, 1, groups)  # noqa: E731
    else:
        inputs = [t.clone().requires_grad_() for t in (x, weight, bias)]
        groups = c_in if depthwise else 1
        forward = lambda: masked_conv2d(*inputs, (0, in_len), (0, out_len), stride, padding, 1, groups,  # noqa: E731
                                        impl=impl)
    grad_out = torch.randn_like(forward().detach())
    return lambda: torch.autograd.grad(forward(), inputs, grad_out)


def median_ms(step, reps, warmup, device):
    for _ in range(warmup):
        step()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            start = time.perf_counter()
            step()
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def supernet_step_benchmark(device, reps, warmup, cuda_reason):
    """One BCNet training step (left + right subnets at mean width 50 %, forward + backward + SGD)
    with each masked_conv2d implementation, against the same step on the two physically slimmed
    subnets (what training the equivalent standalone narrow networks costs). The issue's sizes
    (ResNet-56 batch 128, MobileNetV2 224x224 batch 64) on a GPU; batches cut by 4x / 8x on a CPU."""
    import torchvision

    import compressor as cz
    from compressor.cifar import resnet56

    gpu = device.type == "cuda"
    cases = [("cifar resnet56", resnet56, 32, 128 if gpu else 32),
             ("mobilenet_v2", lambda: torchvision.models.mobilenet_v2(weights=None), 224, 64 if gpu else 8)]
    rows = []
    for name, factory, size, batch in cases:
        torch.manual_seed(0)
        model = factory()
        space = cz.analyze(model, torch.randn(1, 3, size, size))
        cfg = space.uniform(WIDTH)
        x = torch.randn(batch, 3, size, size, device=device)
        y = torch.randint(0, 10, (batch,), device=device)
        slims = [cz.slim(model, space, cfg, side).to(device) for side in ("left", "right")]

        def standalone_step(nets=slims, opt=torch.optim.SGD([p for n in slims for p in n.parameters()], lr=1e-3)):
            opt.zero_grad()
            for net in nets:
                F.cross_entropy(net(x), y).backward()
            opt.step()

        row = {"network": name, "batch": batch, "input": size, "width": WIDTH,
               "standalone_ms": round(median_ms(standalone_step, reps, warmup, device), 2)}
        for impl in ("reference", "sliced", "cuda"):
            if impl == "cuda" and cuda_reason:
                row[impl + "_ms"] = cuda_reason
                continue
            net = cz.supernet(model, space, impl=impl).to(device).train()
            opt = torch.optim.SGD(net.parameters(), lr=1e-3)

            def bcnet_step(net=net, opt=opt):
                opt.zero_grad()
                for side in ("left", "right"):
                    net.set(cfg, side)
                    (0.5 * F.cross_entropy(net(x), y)).backward()
                opt.step()

            row[impl + "_ms"] = round(median_ms(bcnet_step, reps, warmup, device), 2)
        rows.append(row)
        print(f"  step {name:16s} " + "  ".join(f"{k}={v}" for k, v in row.items() if k.endswith("_ms")), flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, help="timed repetitions (default 20 on GPU, 3 on CPU)")
    parser.add_argument("--warmup", type=int, help="untimed repetitions first (default 5 on GPU, 1 on CPU)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "kernels.json")
    parser.add_argument("--part", choices=("all", "layers", "step"), default="all",
                        help="layers: the per-layer table only (no torch-pruning needed); step: the training step only")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    reps = args.reps or (20 if device.type == "cuda" else 3)
    warmup = args.warmup if args.warmup is not None else (5 if device.type == "cuda" else 1)
    dtype = DTYPES[args.dtype]
    cuda_reason = cuda_unavailable_reason(device)

    rows = []
    for name, batch, c_in, c_out, size, kernel, stride, depthwise in (LAYERS if args.part != "step" else ()):
        x, weight, bias = layer_tensors(batch, c_in, c_out, size, kernel, depthwise, device, dtype)
        for impl in IMPLS:
            row = {"layer": name, "batch": batch, "c_in": c_in, "c_out": c_out, "size": size, "kernel": kernel,
                   "stride": stride, "depthwise": depthwise, "impl": impl, "ms": None, "status": "ok"}
            if impl == "cuda" and cuda_reason:
                row["status"] = cuda_reason
            else:
                step = make_step(impl, x, weight, bias, kernel, stride, depthwise)
                row["ms"] = round(median_ms(step, reps, warmup, device), 4)
            rows.append(row)
            print(f"  {name:30s} {impl:16s} {row['ms'] if row['ms'] is not None else row['status']}", flush=True)

    result = {
        "benchmark": "masked_conv2d per-layer forward+backward time",
        "machine": machine_info(),
        "settings": {"device": device.type, "dtype": args.dtype, "width": WIDTH, "reps": reps, "warmup": warmup,
                     "part": args.part},
        "layers": rows,
        "supernet_step": supernet_step_benchmark(device, reps, warmup, cuda_reason) if args.part != "layers" else [],
    }
    write_text_atomic(str(args.out), json.dumps(result, indent=2) + "\n", make_folder=True)
    print_table(rows, device, args.dtype)
    print("\nBCNet training step (left + right), ms; standalone = the two slimmed subnets")
    for row in result["supernet_step"]:
        print("  " + ", ".join(f"{k}: {v}" for k, v in row.items()))
    print(f"wrote {args.out}")


def print_table(rows, device, dtype):
    baseline = {r["layer"]: r["ms"] for r in rows if r["impl"] == "pre-sliced conv"}
    print(f"\nforward+backward ms, median, {device.type}, {dtype}, width {WIDTH:.0%} "
          f"('x' = time / pre-sliced conv time)")
    print(f"{'layer':30s} " + " ".join(f"{impl:>22s}" for impl in IMPLS))
    for layer in baseline:
        cells = []
        for impl in IMPLS:
            row = next(r for r in rows if r["layer"] == layer and r["impl"] == impl)
            cells.append(f"{row['ms']:10.3f} ({row['ms'] / baseline[layer]:5.2f}x)" if row["ms"] is not None
                         else "n/a")
        print(f"{layer:30s} " + " ".join(f"{c:>22s}" for c in cells))


if __name__ == "__main__":
    main()
