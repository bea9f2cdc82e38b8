"""Quality at 50 % FLOPs on CIFAR-10 (JPEG) from the pretrained ResNet-56 in ../shared/data.

Rows, each with the same fine-tuning budget on the JPEG training split:
  original   the pretrained model fine-tuned (the baseline)
  <method>   cz.compress(method=<method>) for every registered method (compressor.methods):
             bcnet, ua (AutoSlim-style unilateral supernet), ...
  uniform    the same width ratio in every group, the widest under the budget, fine-tuned
  tp-l1      Torch-Pruning's L1-magnitude pruner to the same FLOPs, fine-tuned

    python benchmarks/cifar_quality.py                     # CPU-sized: 5k/2k images, 1 epoch each
    python benchmarks/cifar_quality.py --setting quick     # minutes: 2k/1k images, a tiny search
    python benchmarks/cifar_quality.py --setting full      # all 50k/10k images, GPU-sized epochs

Writes benchmarks/results/cifar_quality-<setting>.json and prints a table. Skips (exit 0, with a
message) when ../shared/data is absent.
"""
import argparse
import copy
import sys
import time

import torch

from common import machine_info, write_result
from compressor.methods import METHODS

SETTINGS = {  # train images, test images, supernet epochs, fine-tune epochs, search effort, BN batches
    "quick": dict(train=2000, test=1000, supernet_epochs=1.0, finetune_epochs=1.0, effort=0.05, calib_batches=5),
    "cpu": dict(train=5000, test=2000, supernet_epochs=1.0, finetune_epochs=1.0, effort=0.1, calib_batches=20),
    "full": dict(train=None, test=None, supernet_epochs=30.0, finetune_epochs=15.0, effort=1.0, calib_batches=20),
}


def tp_l1(model, x, flops_target, ignored):
    """Torch-Pruning L1-magnitude pruning, the ratio bisected to land just under flops_target."""
    import torch_pruning as tp

    import compressor as cz
    lo, hi, best = 0.0, 0.9, None
    for _ in range(12):
        ratio = (lo + hi) / 2
        candidate = copy.deepcopy(model).eval()
        pruner = tp.pruner.MagnitudePruner(candidate, x, importance=tp.importance.MagnitudeImportance(p=1),
                                           pruning_ratio=ratio, ignored_layers=[candidate.get_submodule(ignored)])
        pruner.step()
        if cz.measure_flops(candidate, x) <= flops_target:
            best, hi = candidate, ratio
        else:
            lo = ratio
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", choices=SETTINGS, default="cpu",
                        help="quick: minutes on a CPU; cpu: the CPU default; full: all data, GPU-sized epochs")
    parser.add_argument("--budget", default="flops<=50%")
    parser.add_argument("--rows", default=",".join(["original", *METHODS.names(), "uniform", "tp-l1"]))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=0.01, help="supernet learning rate (compress's lr)")
    parser.add_argument("--channel-order", choices=("l1", "l1-both-ends", "none"), default="none",
                        help="compress's channel_order")
    parser.add_argument("--tag", default="", help="suffix of the result file, to keep runs apart")
    args = parser.parse_args()

    import compressor as cz
    from compressor.cifar import load_pretrained, pretrained_path, resnet56
    from compressor.data import cifar10
    from compressor.finetune import accuracy, finetune
    from compressor.search import uniform_baseline

    try:
        weights = pretrained_path("resnet56")
        train = cifar10("train", limit=None, augment=True)
    except FileNotFoundError as e:
        print(f"skipped: {e}")
        return 0
    setting = SETTINGS[args.setting]
    if setting["train"]:
        train = cifar10("train", limit=setting["train"], seed=args.seed, augment=True)
    test = cifar10("test", limit=setting["test"], seed=args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(1, 3, 32, 32)

    def pretrained():
        torch.manual_seed(args.seed)
        return load_pretrained(resnet56(), weights)

    def row(name, model, seconds, **extra):
        model = model.to(device).eval()
        return dict(method=name, accuracy=accuracy(model, test), flops=cz.measure_flops(model.cpu(), x),
                    params=cz.count_params(model), seconds=round(seconds, 1), **extra)

    rows = []
    ft = dict(epochs=setting["finetune_epochs"], lr=0.01, seed=args.seed)
    for name in args.rows.split(","):
        t0 = time.time()
        print(f"--- {name}", flush=True)
        model = pretrained().to(device)
        if name == "original":
            rows.append(row(name, model, 0.0, note="pretrained, before fine-tuning"))
            finetune(model, train, **ft)
            rows.append(row("original+ft", model, time.time() - t0))
        elif name in METHODS:
            result = cz.compress(model, args.budget, train, None, example_input=x, method=name, lr=args.lr,
                                 channel_order=args.channel_order, supernet_epochs=setting["supernet_epochs"],
                                 finetune_epochs=ft["epochs"], finetune_lr=ft["lr"], effort=setting["effort"],
                                 calib_batches=setting["calib_batches"], device=device, seed=args.seed)
            rows.append(row(name, result.model, time.time() - t0, widths=result.widths, side=result.side,
                            supernet_score=result.supernet_score))
        elif name == "uniform":
            space = cz.analyze(model.cpu(), x)
            cfg = uniform_baseline(space, args.budget)
            small = cz.slim(model, space, cfg, "left").to(device)
            finetune(small, train, **ft)
            rows.append(row(name, small, time.time() - t0, widths=list(cfg)))
        elif name == "tp-l1":
            target = cz.analyze(model.cpu(), x)
            limit = cz.parse_budget(args.budget)[0].limit(target.flops(target.max()))
            small = tp_l1(model.cpu(), x, limit, "linear").to(device)
            finetune(small, train, **ft)
            rows.append(row(name, small, time.time() - t0))
        else:
            raise SystemExit(f"unknown row {name!r}")
        print(rows[-1], flush=True)
        # after every row, so an interrupted run keeps what it measured
        path = write_result(f"cifar_quality-{args.setting}{args.tag}.json",
                            {"setting": args.setting, "supernet_lr": args.lr, "channel_order": args.channel_order,
                             "settings": setting, "budget": args.budget, "rows": rows,
                             "complete": len(rows) >= len(args.rows.split(",")), "machine": machine_info()})
    print(f"\nResNet-56, CIFAR-10 JPEG, {args.budget}, '{args.setting}' setting: {setting}")
    print("| method | test top-1 | MFLOPs | params | wall s |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['accuracy']:.2%} | {r['flops'] / 1e6:.1f} | {r['params']:,} | {r['seconds']} |")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
