"""Two budgets from one trained supernet (search_trained) against two compress() runs, on the demo
network (DemoNet on generated shapes, about a minute on 2 CPU cores): wall time per stage, and
whether the slim models are the same (they should be: the supernet is trained on the whole width
space, supernet_window=None, so its training does not depend on the budget).

    python benchmarks/trained_budgets.py [--budgets 'flops<=50%' 'flops<=30%'] [--supernet-epochs 2]

Writes benchmarks/results/trained_budgets.json and prints a table.
"""
import argparse
import tempfile
import time

import torch

from common import machine_info, write_result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", nargs=2, default=["flops<=50%", "flops<=30%"])
    parser.add_argument("--supernet-epochs", type=float, default=4)
    parser.add_argument("--images", type=int, default=2000)
    args = parser.parse_args()

    import compressor as cz
    from compressor.demo import DemoNet, shapes_dataset
    from compressor.finetune import finetune
    torch.set_num_threads(1)  # a 5-MFLOP network gains nothing from a second thread on a shared machine
    torch.manual_seed(0)
    train, test = shapes_dataset(args.images, seed=0), shapes_dataset(500, seed=1)
    model = DemoNet()
    finetune(model, train, epochs=4, lr=0.1, batch_size=64, progress=False)
    options = dict(method="bcnet", supernet_epochs=args.supernet_epochs, finetune_epochs=1, effort=0.1, divisor=4,
                   calib_batches=10, lr=0.05, progress=False, supernet_window=None, supernet_sampling="window")
    first, second = args.budgets

    def timed(fn):
        t = time.perf_counter()
        value = fn()
        return value, round(time.perf_counter() - t, 2)

    with tempfile.TemporaryDirectory() as out:
        a, a_s = timed(lambda: cz.compress(model, first, train, test, out_dir=out, **options))
        b, b_s = timed(lambda: cz.compress(model, second, train, test, **options))
        found, st_s = timed(lambda: cz.search_trained(out, model, [second], train, test, progress=False))
    got = found[second]
    same = got.widths == b.widths and all(torch.equal(v, got.model.state_dict()[k])
                                          for k, v in b.model.state_dict().items())
    rows = {
        "compress, first budget (trains the supernet, keeps it)": {"s": a_s, "timings": a.timings},
        "compress, second budget": {"s": b_s, "timings": b.timings},
        "search_trained, second budget": {"s": st_s, "timings": got.timings},
    }
    payload = {"budgets": args.budgets, "options": options, "images": args.images, "rows": rows,
               "two_compress_runs_s": round(a_s + b_s, 2), "compress_then_search_trained_s": round(a_s + st_s, 2),
               "second_budget_same_model": same, "second_budget_widths": got.widths,
               "second_budget_accuracy": got.result.get("accuracy"), "machine": machine_info()}
    path = write_result("trained_budgets.json", payload)
    print(f"{'':58s} {'seconds':>8s}")
    for name, row in rows.items():
        print(f"{name:58s} {row['s']:8.2f}")
    print(f"two budgets: two compress() runs {a_s + b_s:.1f}s, compress() + search_trained() {a_s + st_s:.1f}s; "
          f"the same model for {second}: {same}\nwrote {path}")


if __name__ == "__main__":
    main()
