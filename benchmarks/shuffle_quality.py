"""Does mapping ShuffleNetV2's shuffled stream (compressor/shuffle.py) deliver a better network at a
budget than keeping the stream at its full width, as analysis did before? CIFAR-10 (JPEG).

The network: torchvision's shufflenet_v2_x0_5(num_classes=10), trained here from scratch on the
whole training split (no pretrained CIFAR ShuffleNet is among the shared data; Torch-Pruning
cannot prune it: its graph divides by zero at the shuffle). Trained once per --pretrain-epochs and
cached in ~/.cache/compressor (SGD, lr 0.1, cosine, batch 128, crop and flip, seed 0).

Rows, at each budget and seed, with quality.py's setting (cpu: 4,000 training images, 5,000 test
images, one supernet and one fine-tuning epoch; the same images and recipe for every row):
  mapped    cz.compress(map_shuffles=True), otherwise its defaults: each stage's stream is one width
            variable (the rows at 973f315 ran when this was the default)
  frozen    cz.compress() with its defaults: the streams keep their width; the branches, stem and
            conv5 slim (the rows at 973f315 replaced compressor.space.shuffled_streams by one that
            maps nothing, the same analysis)
  uniform   the same bin in every group (streams at their nearest admitted width), the widest that
            fits, fine-tuned for the supernet + fine-tuning epochs (quality.py's same-total)

    python benchmarks/shuffle_quality.py [--budgets 'flops<=50%;flops<=30%'] [--seeds 0,1,2]

Writes benchmarks/results/shuffle-quality<tag>.json after every row and resumes from it; skips (exit 0)
when ../shared/data is absent.
"""
import argparse
import copy
import json
import os
import statistics
import sys
import time

import torch

from common import RESULTS, commit, machine_info, write_result
from quality import SETTINGS

ROWS = ("mapped", "frozen", "uniform")


def pretrained_shufflenet(epochs, device):
    """shufflenet_v2_x0_5 trained on all 50,000 CIFAR-10 training images (cached), and its record."""
    import torchvision
    from compressor.data import cifar10
    from compressor.finetune import finetune
    path = os.path.expanduser(f"~/.cache/compressor/shufflenet_v2_x0_5-cifar10-{epochs}ep.pt")
    torch.manual_seed(0)
    model = torchvision.models.shufflenet_v2_x0_5(num_classes=10)
    if os.path.exists(path):
        saved = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(saved["state"])
        return model.to(device).eval(), saved["record"]
    t0 = time.time()
    run = finetune(model.to(device), cifar10("train", augment=True), epochs=epochs, batch_size=128, lr=0.1,
                   weight_decay=5e-4, label_smoothing=0.0, seed=0, progress=True)
    record = {"epochs": epochs, "seconds": round(time.time() - t0, 1), "final_loss": run["final_loss"]}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"state": model.state_dict(), "record": record}, path + ".tmp")
    os.replace(path + ".tmp", path)
    return model.eval(), record


def summarise(rows, budgets):
    lines = ["| budget | row | top-1 % (mean of seeds) | per seed | MFLOPs | params (M) |", "|---|---|---|---|---|---|"]
    for budget in budgets:
        for row in ROWS:
            found = sorted((r for r in rows if r["budget"] == budget and r["row"] == row), key=lambda r: r["seed"])
            if not found:
                continue
            acc = [100 * r["accuracy"] for r in found]
            spread = f" ± {statistics.stdev(acc):.1f}" if len(acc) > 1 else ""
            lines.append(f"| {budget} | {row} | {statistics.mean(acc):.1f}{spread} | {' / '.join(f'{a:.1f}' for a in acc)} "
                         f"| {statistics.mean(r['flops'] for r in found) / 1e6:.2f} "
                         f"| {statistics.mean(r['params'] for r in found) / 1e6:.3f} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", choices=SETTINGS, default="cpu")
    parser.add_argument("--budgets", default="flops<=50%;flops<=30%")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--pretrain-epochs", type=int, default=12)
    parser.add_argument("--finetune-epochs", type=float, help="compress's fine-tuning epochs (default: the setting's)")
    parser.add_argument("--tag", default="", help="suffix of the result file, to keep runs apart")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (recorded)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import compressor as cz
    from compressor.data import cifar10
    from compressor.finetune import accuracy, finetune
    from compressor.config import CompressConfig
    from compressor.search import uniform_baseline
    try:
        cifar10("test", limit=10)
    except FileNotFoundError as e:
        print(f"skipped: {e}")
        return 0
    device = "cuda" if torch.cuda.is_available() else "cpu"
    setting = dict(SETTINGS[args.setting])
    if args.finetune_epochs is not None:
        setting["finetune_epochs"] = args.finetune_epochs
    budgets = [b.strip() for b in args.budgets.split(";") if b.strip()]
    seeds = [int(s) for s in args.seeds.split(",")]
    x = torch.randn(1, 3, 32, 32)
    base, record = pretrained_shufflenet(args.pretrain_epochs, device)
    full_test = cifar10("test")
    run = {"setting": setting, "pretrain": record, "pretrained_top1_all_10000": accuracy(base, full_test)}
    name = f"shuffle-quality{args.tag}.json"
    path = os.path.join(RESULTS, name)
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        if saved["run"] != run:
            raise SystemExit(f"{path} holds a run with other settings: delete it to start over")
        rows = saved["rows"]
    done = {(r["budget"], r["seed"], r["row"]) for r in rows}
    code = commit()
    print(f"pretrained shufflenet_v2_x0_5: {100 * run['pretrained_top1_all_10000']:.1f} % on all 10,000 test images")

    for seed in seeds:
        train = cifar10("train", limit=setting["train"], seed=seed, augment=True)
        test = cifar10("test", limit=setting["test"], seed=seed)
        for budget in budgets:
            for row in ROWS:
                if (budget, seed, row) in done:
                    continue
                t0 = time.time()
                original = base.to(device)
                if row == "uniform":
                    space = cz.analyze(original.cpu(), x, map_shuffles=True)
                    small = cz.slim(original, space, uniform_baseline(space, budget), "left").to(device)
                    finetune(small, train, epochs=setting["supernet_epochs"] + setting["finetune_epochs"],
                             batch_size=setting["batch_size"], seed=seed, progress=False,
                             teacher=copy.deepcopy(original).eval() if CompressConfig.distill else None)
                    extra = {}
                else:
                    result = cz.compress(original, budget, train, None, example_input=x, map_shuffles=row == "mapped",
                                         supernet_epochs=setting["supernet_epochs"],
                                         finetune_epochs=setting["finetune_epochs"], effort=setting["effort"],
                                         calib_batches=setting["calib_batches"], batch_size=setting["batch_size"],
                                         device=device, seed=seed, progress=False)
                    small = result.model
                    extra = {"widths": result.widths, "channels": result.channels}
                small = small.eval()
                rows.append(dict(budget=budget, seed=seed, row=row, accuracy=accuracy(small, test),
                                 flops=cz.measure_flops(small.cpu(), x), params=cz.count_params(small),
                                 stream_channels=[small.get_submodule(f"stage{s}.0.branch2.5").out_channels
                                                  for s in (2, 3, 4)],
                                 seconds=round(time.time() - t0, 1), commit=code, **extra))
                print(json.dumps({k: v for k, v in rows[-1].items() if k not in ("widths", "channels")}), flush=True)
                write_result(name, {"run": run, "rows": rows, "machine": machine_info(),
                                    "torch_threads": torch.get_num_threads()})
    print(summarise(rows, budgets))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
