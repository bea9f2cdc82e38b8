"""The `compressor` command: demo, analyze, compress, search, export, bench."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from .budget import LATENCY_TARGETS
from .config import BINNINGS, CHANNEL_ORDERS, CONV_IMPLS, INHERIT, REPARAMS, SCORE_METRICS, CompressConfig
from .errors import CompressorError, ConfigError
from .formats import EXPORT_FORMATS, PRECISIONS, RUNTIMES, export_format


class _MethodNames:
    """--method's choices, read from the method registry only when asked (the registry imports
    torch; `compressor bench` must not)."""

    def _names(self):
        from .methods import METHODS
        return METHODS.names()

    def __contains__(self, name):
        return name in self._names()

    def __iter__(self):
        return iter(self._names())


def _model_and_input(spec, weights, image_size):
    import torch

    from .models import load_model
    return load_model(spec, weights), torch.randn(1, 3, image_size, image_size)


MAP_SHUFFLES_HELP = ("slim a channel-shuffled stream (ShuffleNetV2's) as one width per stream instead of keeping "
                     "it (off by default: worse networks on a CIFAR-10 ShuffleNetV2, README)")


def divisor_arg(text):
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--divisor takes a positive integer or 'auto', got {text!r}") from None


def cmd_demo(args):
    from .demo import run_demo
    run_demo(out_dir=args.out, seed=args.seed, progress=not args.quiet)


def cmd_analyze(args):
    from .space import analyze
    model, x = _model_and_input(args.model, args.weights, args.image_size)
    space = analyze(model, x, bins=args.bins, divisor=args.divisor, binning=args.binning, map_shuffles=args.map_shuffles)
    print(space.describe())
    full = space.max()
    print(f"\n{len(space)} groups, {len(space.frozen)} frozen; {space.flops(full) / 1e6:.1f} MFLOPs, "
          f"{space.params(full):,} parameters at {args.image_size}x{args.image_size}")


def _split_folder(path):
    """(train folder, validation folder or None): DIR/train + DIR/val|test, or DIR itself."""
    train = os.path.join(path, "train")
    if not os.path.isdir(train):
        return path, None
    val = next((os.path.join(path, v) for v in ("val", "test") if os.path.isdir(os.path.join(path, v))), None)
    return train, val


def _method_options(pairs, flag="--method-option"):
    """["n_random=3", "complementary=false"] -> {"n_random": 3, "complementary": False} (values
    read as JSON, else kept as text)."""
    options = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"{flag} takes KEY=VALUE, got {pair!r}")
        try:
            options[key] = json.loads(value)
        except ValueError:
            options[key] = value
    return options


def cmd_compress(args):
    from .api import compress
    from .data import image_folder
    config = compress_config(args)  # a wrong option fails before the model and the data are read
    model, x = _model_and_input(args.model, args.weights, args.image_size)
    train_dir, val_dir = _split_folder(args.data)
    train = image_folder(train_dir, args.image_size)
    val = image_folder(val_dir, args.image_size) if val_dir else None
    result = compress(model, args.budget, train, val, config=config, example_input=x, device=args.device,
                      out_dir=args.out, progress=not args.quiet, restart=args.restart,
                      keep_checkpoints=args.keep_checkpoints,
                      latency_options=None if args.latency_batch is None else {"batch": args.latency_batch})
    print(json.dumps({k: getattr(result, k) for k in ("widths", "side", "original", "result", "limits", "paths")},
                     indent=1))


def compress_config(args) -> CompressConfig:
    """The CompressConfig of `compressor compress` arguments: the one compress(**options) builds."""
    return CompressConfig.build(**{name: getattr(args, name) for name in _CONFIG_ARGS if getattr(args, name) is not None},
                                method_options=_method_options(args.method_option) or None,
                                reparam_options=_method_options(args.reparam_option, "--reparam-option") or None,
                                export=tuple(e for e in args.export.split(",") if e))


def cmd_search(args):
    from .api import pareto_front, pick_point, search_trained
    check_search_mode(args)
    from .data import image_folder
    options = {name: getattr(args, name) for name in _SEARCH_ARGS if getattr(args, name) is not None}
    if args.export is not None:
        options["export"] = tuple(e for e in args.export.split(",") if e)
    model, x = _model_and_input(args.model, args.weights, args.image_size)
    train_dir, val_dir = _split_folder(args.data)
    train = image_folder(train_dir, args.image_size)
    val = image_folder(val_dir, args.image_size) if val_dir else None
    common = dict(example_input=x, device=args.device, progress=not args.quiet)
    out = getattr(args, "from")
    if args.pareto is not None:
        from .pareto import table
        found = pareto_front(out, model, train, val, metric=args.pareto, limit=args.limit, target=args.target,
                             **common, **options)
        print(table(found.front, found.metric))
        print(f"{len(found.front)} points of {len(found.history)} candidates; wrote {found.paths['front']} and "
              f"{found.paths['plot']}; deliver one with: compressor search --from {out} ... --pick INDEX")
        return
    if args.pick is not None:
        results = {f"pick {args.pick}": pick_point(out, model, args.pick, train, val, **common, **options)}
    else:
        results = search_trained(out, model, args.budget, train, val, target=args.target, **common, **options)
    print(json.dumps({budget: {k: getattr(r, k) for k in ("widths", "side", "original", "result", "limits", "paths")}
                      for budget, r in results.items()}, indent=1))


def check_search_mode(args):
    """`compressor search` takes one of --budget, --pareto and --pick (ConfigError otherwise)."""
    given = [flag for flag, value in (("--budget", args.budget), ("--pareto", args.pareto), ("--pick", args.pick))
             if value is not None]
    if len(given) != 1:
        raise ConfigError("compressor search takes one of --budget (search each budget), --pareto METRIC (the front "
                          "of score vs cost) or --pick INDEX (deliver a point of that front)"
                          + (f", not {' and '.join(given)}" if given else ""))
    if args.limit is not None and args.pareto is None:
        raise ConfigError("--limit bounds the cost axis of --pareto: give it with --pareto, or use --budget")


# the search flags: options a search of a trained supernet may change (None: the trained run's)
_SEARCH_ARGS = ("effort", "finetune_epochs", "finetune_lr", "inherit", "score_metric")

# the compress flags that are CompressConfig fields of the same name (None: the config's default)
_CONFIG_ARGS = ("method", "supernet_epochs", "finetune_epochs", "batch_size", "lr", "finetune_lr", "effort",
                "channel_order", "divisor", "inherit", "score_metric", "seed_population", "conv_impl", "distill",
                "seed", "reparam", "broaden", "binning", "map_shuffles")


def cmd_export(args):
    import torch

    from .exporters import export_file
    from .slim import load_slim
    from .data import image_folder
    fmt = export_format(args.format, args.precision)
    model = load_slim(args.model, trust_source=args.trust_source).eval()
    x = torch.randn(1, 3, args.image_size, args.image_size)
    calib = image_folder(args.calib_data, args.image_size) if args.calib_data else None
    out = args.out or fmt.filename(os.path.splitext(args.model)[0])
    _check_folder_writable(out)
    meta = {k: json.dumps(v) for k, v in model.compressor_info.items()}
    written = export_file(model, x, out, fmt=fmt.runtime, precision=fmt.precision, calib_data=calib, metadata=meta)
    print("wrote", written)


def cmd_bench(args):
    from .latency.filebench import bench_files, parse_shape
    doc = bench_files(args.model, target=args.target, batch=args.batch,
                      input_shape=parse_shape(args.input) if args.input else None, threads=args.threads,
                      warmup=args.warmup, reps=args.reps, trust_source=args.trust_source)
    for r in doc["results"]:
        print(f"{r['model']} on {args.target}, batch {r['batch']}: p50 {r['p50_ms']:.3f} ms, p90 {r['p90_ms']:.3f} ms, "
              f"p99 {r['p99_ms']:.3f} ms, {r['throughput_per_s']:.1f} samples/s" + (" (unstable timing)" if r["unstable"] else ""))
    if args.json:
        _check_folder_writable(args.json)
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)


BINNING_HELP = ("how bins map to widths: channels (equal channel steps, default) or flops (CafeNet's FLOPs-sensitive "
                "bins: every width step adds about the same FLOPs, so cheap layers get coarser bins)")
TRUST_HELP = ("rebuild a model.pt whose source is a .py file or module:callable (runs that code); by default "
              "only torchvision, timm and compressor builders are rebuilt")

# arguments that must be positive integers, and the one that may be zero
_POSITIVE = ("image_size", "batch", "batch_size", "bins", "divisor", "reps", "threads")


def check_args(args):
    """Numeric arguments argparse lets through: --image-size 0, --batch 0, ... (ConfigError)."""
    for name in _POSITIVE + ("warmup",):
        value = getattr(args, name, None)
        if isinstance(value, int) and value < (0 if name == "warmup" else 1):  # divisor may be "auto"
            flag = "--" + name.replace("_", "-")
            raise ConfigError(f"{flag} must be {'>= 0' if name == 'warmup' else 'a positive integer'}, got {value}")
    for name in ("supernet_epochs", "finetune_epochs"):
        value = getattr(args, name, None)
        if value is not None and value < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {value}")
    effort = getattr(args, "effort", None)
    if effort is not None and not effort > 0:
        raise ConfigError(f"--effort must be positive, got {effort}")


def _check_folder_writable(path):
    """The folder `path` will be written into exists or can be made, and takes files."""
    from .files import check_output_folder
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        check_output_folder(folder)
    except OSError as e:
        raise ConfigError(f"cannot write {path!r}: {e}; choose a writable --out") from e


def build_parser():
    parser = argparse.ArgumentParser(prog="compressor",
                                     description="Width search, slimming and reconstruction for pretrained CNNs.")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="pretrain a small CNN on generated shapes and compress it to 50%% FLOPs")
    p.add_argument("--out", help="also write report.json, model.pt and pareto.png here")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)

    def model_args(p):
        p.add_argument("--model", required=True, help="torchvision:NAME, path/to/file.py:factory or package.module:factory")
        p.add_argument("--weights", help="a state-dict file to load into the model")
        p.add_argument("--image-size", type=int, default=224)

    p = sub.add_parser("analyze", help="print a model's channel groups and cost")
    model_args(p)
    p.add_argument("--bins", type=int, default=20)
    p.add_argument("--divisor", type=divisor_arg, default="auto", help="an integer, or auto (default)")
    p.add_argument("--binning", choices=BINNINGS, default="channels", help=BINNING_HELP)
    p.add_argument("--map-shuffles", action="store_true", help=MAP_SHUFFLES_HELP)
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("compress", help="compress a model to a budget (default method: recon; bcnet, ua, mctnas, swp, bsnas, cafenet, dagger)")
    model_args(p)
    p.add_argument("--data", required=True, help="an ImageFolder directory, or one with train/ and val/ (or test/)")
    p.add_argument("--budget", required=True, help="e.g. 'flops<=50%%' or 'flops<=50%%,params<=2.5M'")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--latency-batch", type=int, metavar="N",
                   help="images per timed call of a latency budget, the deployment's batch (default 1)")
    p.add_argument("--method", choices=_MethodNames(), default=CompressConfig.method, metavar="METHOD",
                   help="a registered method: %(choices)s (default: %(default)s)")
    p.add_argument("--method-option", action="append", metavar="KEY=VALUE",
                   help="an option of the method, e.g. local=8 (recon), complementary=false (bcnet) or n_random=3 "
                   "(ua); repeatable")
    p.add_argument("--supernet-epochs", type=float, default=CompressConfig.supernet_epochs)
    p.add_argument("--finetune-epochs", type=float, default=CompressConfig.finetune_epochs)
    p.add_argument("--batch-size", type=int, default=CompressConfig.batch_size)
    p.add_argument("--lr", type=float, help="supernet learning rate (default: compress()'s)")
    p.add_argument("--finetune-lr", type=float, help="fine-tuning learning rate (default: compress()'s)")
    p.add_argument("--effort", type=float, default=CompressConfig.effort, help="search effort (1.0 = population 50 x 40 generations)")
    p.add_argument("--channel-order", choices=tuple(CHANNEL_ORDERS),
                   default=CompressConfig.channel_order, help="order each group's channels by importance before training (default: "
                   "taylor, |w dL/dw|; l1: weight magnitude; none: keep the model's order)")
    p.add_argument("--divisor", type=divisor_arg, default="auto",
                   help="widths are multiples of this (an integer; default auto: per group, see analyze)")
    p.add_argument("--binning", choices=BINNINGS, default=CompressConfig.binning,
                   help=BINNING_HELP.replace("channel steps, default", "channel steps") + "; default flops, channels "
                   "when the method broadens the space (bsnas)")
    p.add_argument("--map-shuffles", action="store_true", default=None, help=MAP_SHUFFLES_HELP)
    p.add_argument("--inherit", choices=INHERIT, default=CompressConfig.inherit,
                   help="the slim model's weights: the trained supernet's, the original's, or the better-scoring")
    p.add_argument("--score-metric", choices=SCORE_METRICS, default=CompressConfig.score_metric,
                   help="what ranks candidates on the held-out split")
    p.add_argument("--no-seed-population", dest="seed_population", action="store_false",
                   help="leave the uniform and global-importance configurations out of the initial population")
    p.add_argument("--conv-impl", choices=CONV_IMPLS, default=CompressConfig.conv_impl,
                   help="masked convolution in supernet training (auto: the CUDA kernel on a GPU, else sliced)")
    p.add_argument("--distill", action=argparse.BooleanOptionalAction, default=CompressConfig.distill,
                   help="distil the original model into the subnets and the fine-tuned model (default: on)")
    p.add_argument("--reparam", choices=[r for r in REPARAMS if r],
                   help="fine-tune with re-parameterisable branches searched per layer (RepNAS), fused before "
                   "export (default: off)")
    p.add_argument("--reparam-option", action="append", metavar="KEY=VALUE",
                   help="an option of --reparam, e.g. branches=20 or search_part=0.5; repeatable")
    p.add_argument("--broaden", type=float,
                   help="widths up to this ratio of the original, new channels starting function-preserving "
                   "(default: the method's, 1.5 for bsnas, else 1)")
    p.add_argument("--export", default="", help=f"comma-separated: {', '.join(EXPORT_FORMATS)}")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--restart", action="store_true",
                   help="discard a supernet checkpoint of another run in --out and start over (default: refuse)")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep the supernet checkpoints in --out after success (default: removed)")
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("search", help="search the supernet a compress run (--method bcnet or ua) kept in --from for "
                       "more budgets, without training it again: each into --from/budget-<budget>/")
    model_args(p)
    p.add_argument("--from", required=True, metavar="OUT", help="the --out folder of that compress run (supernet.pt)")
    p.add_argument("--data", required=True, help="the compress run's --data (checked: the same images)")
    p.add_argument("--budget", action="append", help="e.g. 'flops<=30%%'; repeatable")
    p.add_argument("--pareto", choices=("flops", "params", "latency"),
                   help="instead of budgets: one multi-objective search, held-out score vs this cost; writes "
                   "--from/pareto/front.json and front.png and prints the front (latency: with --target)")
    p.add_argument("--limit", help="with --pareto: an upper bound on the cost, e.g. 60%%, 2.5M or 2ms (default: none)")
    p.add_argument("--pick", type=int, metavar="INDEX",
                   help="deliver point INDEX of the front --pareto wrote (0: the cheapest): slimmed, fine-tuned and "
                   "written into --from/pareto/point-INDEX/ like a budget's folder")
    p.add_argument("--target", choices=LATENCY_TARGETS,
                   help="the target of latency budgets that name none, e.g. --budget 'latency<=2ms' --target ort-cpu, "
                   "or of --pareto latency")
    p.add_argument("--effort", type=float, help="search effort (default: the compress run's)")
    p.add_argument("--finetune-epochs", type=float, help="default: the compress run's")
    p.add_argument("--finetune-lr", type=float, help="default: the compress run's")
    p.add_argument("--inherit", choices=INHERIT, help="default: the compress run's")
    p.add_argument("--score-metric", choices=SCORE_METRICS, help="default: the compress run's")
    p.add_argument("--export", help=f"comma-separated: {', '.join(EXPORT_FORMATS)} (default: the compress run's)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("export", help="export a slim model (model.pt from save_slim) to ONNX or TensorRT")
    p.add_argument("model", help="a .pt file written by compressor (save_slim)")
    p.add_argument("--format", choices=RUNTIMES, default="onnx")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32", help="fp16 and int8: --format trt only")
    p.add_argument("--calib-data", help="ImageFolder directory for int8 calibration")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--out", help="output path (default: beside the model)")
    p.add_argument("--trust-source", action="store_true", help=TRUST_HELP)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("bench", help="latency of a .pt (save_slim), .onnx or .engine file (or of every .onnx file in "
                       "a folder): p50, p90, p99, throughput; an .onnx file needs only onnxruntime and numpy")
    p.add_argument("model", help="model.pt, model.onnx, model.engine, or a folder of .onnx files (latency probes)")
    p.add_argument("--target", default="ort-cpu", help=", ".join(LATENCY_TARGETS))
    p.add_argument("--batch", type=int, help="batch size (default: the first dim of --input, an .onnx file's static batch, else 1)")
    p.add_argument("--input", help="input shape NxCxHxW (default 1x3x224x224; an .onnx file's own static shape)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (torch / ONNX Runtime intra-op)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--reps", type=int, default=100)
    p.add_argument("--json", help="also write the numbers, the machine and the runtime versions to this JSON file "
                   "(build_latency_model(measurements=...) reads it back)")
    p.add_argument("--trust-source", action="store_true", help=TRUST_HELP)
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        check_args(args)
        args.func(args)
    except (CompressorError, OSError) as e:  # OSError: a missing, unreadable or unwritable file
        print(f"compressor: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
