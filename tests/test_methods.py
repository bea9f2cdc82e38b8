"""Every registered method (compressor.methods) passes one contract: it trains a few steps on a
tiny network, a run killed mid-training resumes to the identical result, the configuration it
delivers is inside the budget, and the supernet computes exactly what the slim model computes for
that configuration. Plus the registry and the method options."""
import os
import subprocess
import sys

import pytest
import torch

import compressor as cz
from compressor.methods import METHODS, Method, get_method
from compressor.placement import base_side
from compressor.registry import Registry
from compressor.train import CHECKPOINT

TESTS = os.path.dirname(os.path.abspath(__file__))

NOISY = """
class Noisy(torch.utils.data.Dataset):  # augmentation from the global RNG; SIGKILLs its process at
    def __init__(self, data, armed):    # the kill_at-th item read once armed() holds (kill_at 0: never)
        self.data, self.armed, self.calls = data, armed, 0
    def __len__(self):
        return len(self.data)
    def __getitem__(self, i):
        if self.armed():
            self.calls += 1
            if self.calls == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
        x, y = self.data[i]
        return x + 0.1 * torch.randn_like(x), y
"""

CONTRACT_SCRIPT = """
import os, signal, sys
import torch
sys.path.insert(0, {tests!r})
import compressor as cz
from compressor.finetune import loader
from compressor.methods import get_method
from conftest import TinyNet, quadrant_data

method, ckpt, out, kill_at = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])

{noisy}
torch.manual_seed(0)
model = TinyNet()
space = cz.analyze(model, torch.randn(1, 3, 16, 16), bins=8, divisor=1)
net = cz.supernet(model, space)
spec = get_method(method)
trained = cz.train_supernet(net, Noisy(quadrant_data(256), lambda: True), method=method, steps=12, batch_size=16,
                            checkpoint_dir=ckpt, checkpoint_every=4, lr=0.05, progress=False)
calib, held_out = loader(quadrant_data(64, seed=1), 16), loader(quadrant_data(64, seed=2), 16)
found = spec.searcher(net, "flops<=60%", calib, held_out, records=trained.records, effort=0.05,
                      calib_batches=2, sides=spec.sides, progress=False)
cz.recalibrate_bn(net, found.cfg, found.side, calib, batches=2)
small = cz.slim(model, space, found.cfg, found.side).eval()
x = torch.randn(8, 3, 16, 16)
with torch.no_grad():
    y_net, y_small = net(x), small(x)  # recalibrate_bn left the chosen configuration active, in eval mode
net.full()
torch.save({{"state": model.state_dict(), "records": trained.records, "cfg": list(found.cfg), "side": found.side,
            "flops": space.flops(found.cfg), "measured": cz.measure_flops(small, x[:1]),
            "limit": found.limits["flops"], "sides": list(spec.sides),
            "parity": float((y_net - y_small).abs().max() / y_small.abs().max())}}, out)
"""


def run_script(tmp_path, text, *args):
    """The exit code of `text` (a script template) run as a new Python process with `args`."""
    script = tmp_path / "contract.py"
    script.write_text(text.format(tests=TESTS, noisy=NOISY))
    return subprocess.run([sys.executable, str(script), *map(str, args)], timeout=600).returncode


def run_contract(tmp_path, method, tag, kill_at=0):
    out = tmp_path / f"{tag}.pt"
    return run_script(tmp_path, CONTRACT_SCRIPT, method, tmp_path / f"ckpt-{tag}", out, kill_at), out


@pytest.mark.parametrize("name", METHODS.names())
def test_method_contract(name, tmp_path):
    if get_method(name).fit is not None:
        pytest.skip(f"{name} replaces the supernet fit step: its contract runs through compress() (test_fit_method_contract)")
    code, ref_out = run_contract(tmp_path, name, "ref")
    assert code == 0
    ref = torch.load(ref_out, weights_only=True)

    # killed during step 10 of 12 (16 samples a step), after the checkpoint of step 8; then resumed
    code, out = run_contract(tmp_path, name, "run", kill_at=9 * 16 + 5)
    assert code == -9 and not out.exists(), "the run was not killed mid-training: the test proves nothing"
    assert torch.load(tmp_path / "ckpt-run" / CHECKPOINT, weights_only=True)["step"] == 8
    code, out = run_contract(tmp_path, name, "run")
    assert code == 0
    got = torch.load(out, weights_only=True)
    assert got["records"] == ref["records"] and len(ref["records"]) > 0
    assert (got["cfg"], got["side"]) == (ref["cfg"], ref["side"])
    for k, v in ref["state"].items():
        assert torch.equal(got["state"][k], v), k

    assert ref["flops"] == ref["measured"] <= ref["limit"]  # inside its budget, by the exact count
    assert base_side(ref["side"]) in ref["sides"]  # a side of the method's, or a placement on it (cafenet)
    assert ref["parity"] <= 1e-4  # the supernet's chosen subnet is the slim model


FIT_CONTRACT_SCRIPT = """
import os, signal, sys
import torch
sys.path.insert(0, {tests!r})
import compressor as cz
from conftest import TinyNet, quadrant_data

method, options, out_dir, out, kill_at = sys.argv[1], eval(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
checkpoints = os.path.join(out_dir, "checkpoints")

{noisy}
torch.manual_seed(0)
result = cz.compress(TinyNet(), "flops<=60%", Noisy(quadrant_data(256), lambda: os.path.isdir(checkpoints) and
                           os.listdir(checkpoints)), method=method, method_options=options, finetune_epochs=0, batch_size=16, bins=8, divisor=1, out_dir=out_dir, progress=False)
torch.save({{"state": result.model.state_dict(), "widths": result.widths, "side": result.side,
            "flops": result.result["flops"], "measured": cz.measure_flops(result.model, torch.randn(1, 3, 16, 16)),
            "limit": result.limits["flops"]}}, out)
"""

# a fit method's options that make it write checkpoints within a few steps on the contract's data
FIT_CONTRACT_OPTIONS = {"dagger": {"epochs": 1.0, "checkpoint_every": 4}}


def run_fit_contract(tmp_path, method, tag, kill_at=0):
    out = tmp_path / f"{tag}.pt"
    return run_script(tmp_path, FIT_CONTRACT_SCRIPT, method, repr(FIT_CONTRACT_OPTIONS.get(method, {})),
                      tmp_path / f"out-{tag}", out, kill_at), out


@pytest.mark.parametrize("name", [n for n in METHODS.names() if get_method(n).fit is not None])
def test_fit_method_contract(name, tmp_path):
    """A method that replaces the fit step, through compress() with an out_dir: killed after its first
    checkpoint, it resumes to the identical slim model; a checkpoint records its step and steps; the
    model is inside the budget by the exact count, on one of the method's sides. A fit that trains
    nothing (recon) has no checkpoint: run again, it gives the identical slim model."""
    trains = not get_method(name).finetunes_supernet_epochs
    assert not trains or name in FIT_CONTRACT_OPTIONS, \
        f"add {name}'s options to FIT_CONTRACT_OPTIONS: checkpoints within a few steps"
    code, ref_out = run_fit_contract(tmp_path, name, "ref")
    assert code == 0
    ref = torch.load(ref_out, weights_only=True)

    if trains:
        code, out = run_fit_contract(tmp_path, name, "run", kill_at=5)  # a few items into the step after a checkpoint
        assert code == -9 and not out.exists(), "the run was not killed mid-training: the test proves nothing"
        saved = [torch.load(p, weights_only=True) for p in (tmp_path / "out-run" / "checkpoints").glob("*.pt")]
        assert len(saved) == 1 and 0 < saved[0]["step"] < saved[0]["steps"], "killed after the fit step's training"
    code, out = run_fit_contract(tmp_path, name, "run")
    assert code == 0
    got = torch.load(out, weights_only=True)
    assert (got["widths"], got["side"]) == (ref["widths"], ref["side"])
    for k, v in ref["state"].items():
        assert torch.equal(got["state"][k], v), k

    assert ref["flops"] == ref["measured"] <= ref["limit"]  # inside its budget, by the exact count
    assert ref["side"] in get_method(name).sides


@pytest.mark.parametrize("name", METHODS.names())
def test_method_descriptor_and_options(name):
    spec = get_method(name)
    assert isinstance(spec, Method) and spec.name == name and get_method(spec) is spec
    assert spec.sides and set(spec.sides) <= {"left", "right"}
    assert spec.parse_options(None) == spec.options()  # every option has a default
    assert spec.parse_options(spec.options()) == spec.options()
    with pytest.raises(cz.ConfigError, match=f"unknown option 'no_such_knob' for method '{name}': valid options"):
        spec.parse_options({"no_such_knob": 1})


def test_options_reach_the_sampler():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 2))
    space = cz.analyze(model, torch.randn(1, 3, 8, 8), bins=4, divisor=1)
    ua = get_method("ua")
    assert len(ua.sampler(space, 0, ua.parse_options({"n_random": 5})).next()) == 7  # largest + smallest + 5
    bcnet = get_method("bcnet")
    sampler = bcnet.sampler(space, 0, bcnet.parse_options({"complementary": False}))
    sampler.next()
    assert sampler.pending is None  # no complement owed: every step draws afresh
    with pytest.raises(cz.ConfigError, match="n_random"):
        ua.parse_options({"n_random": -1})
    with pytest.raises(cz.ConfigError, match="complementary"):
        bcnet.parse_options({"complementary": "yes"})


def test_unknown_method_lists_the_registered_ones():
    with pytest.raises(cz.ConfigError, match="unknown method 'fancy': use 'bcnet'.* 'ua'"):
        get_method("fancy")


def test_compress_and_cli_take_methods_and_options_from_the_registry():
    from compressor.cli import build_parser
    from conftest import TinyNet, quadrant_data

    compress = next(a for a in build_parser()._subparsers._group_actions[0].choices["compress"]._actions
                    if a.dest == "method")
    assert tuple(compress.choices) == METHODS.names()
    args = build_parser().parse_args(["compress", "--model", "m", "--data", "d", "--budget", "flops<=50%", "--out", "o",
                                      "--method", "ua", "--method-option", "n_random=3"])
    from compressor.cli import _method_options
    assert _method_options(args.method_option) == {"n_random": 3}
    assert _method_options(["complementary=false", "tag=x"]) == {"complementary": False, "tag": "x"}
    with pytest.raises(cz.ConfigError, match="KEY=VALUE"):
        _method_options(["n_random"])
    with pytest.raises(cz.ConfigError, match="unknown option 'n_randmo' for method 'ua': valid options are 'n_random'"):
        cz.compress(TinyNet(), "flops<=50%", quadrant_data(64), method="ua", method_options={"n_randmo": 3},
                    progress=False)


def test_registry_refuses_duplicates():
    registry = Registry("thing")

    @registry.register("a")
    def a():
        pass

    assert registry.get("a") is a and "a" in registry and registry.names() == ("a",)
    with pytest.raises(ValueError, match="thing 'a' is already registered"):
        registry.register("a", object())
    with pytest.raises(cz.ConfigError, match="unknown thing 'b': use 'a'"):
        registry.get("b")
    with pytest.raises(ValueError, match="already registered"):
        METHODS.register("bcnet", get_method("bcnet"))


def test_a_method_can_replace_the_whole_fit_step():
    """A method that is not a supernet (DAGGER, later) gives `fit`: compress() delivers, fine-tunes
    and measures whatever it returns, and never builds or trains a supernet."""
    from compressor.methods import Fitted
    from compressor.search import SearchResult, uniform_baseline
    from conftest import TinyNet, quadrant_data

    seen = {}

    def fit(ctx):
        seen["options"], seen["train"] = ctx.options, len(ctx.train_data)
        cfg = uniform_baseline(ctx.space, ctx.budget)
        found = SearchResult(cfg=cfg, side="left", score_left=0.5, score_right=float("nan"), score=0.5,
                             costs={"flops": ctx.space.flops(cfg)}, limits=ctx.limits, history=[])
        return Fitted(cz.slim(ctx.model, ctx.space, cfg, "left"), found, timings={"fit_s": 0.0})

    uniform = Method(name="uniform-test", sampler=None, fit=fit, sides=("left",))
    torch.manual_seed(0)
    result = cz.compress(TinyNet(), "flops<=50%", quadrant_data(128), method=uniform, finetune_epochs=0.25,
                         batch_size=32, bins=8, divisor=1, progress=False)
    assert result.method == "uniform-test" and result.meets_budget() and result.side == "left"
    assert seen == {"options": uniform.options(), "train": 115}  # the training split: 10 % is held out
    assert "fit_s" in result.timings and "supernet_s" not in result.timings
    with pytest.raises(cz.ConfigError, match="does not train a supernet"):
        cz.train_supernet(cz.supernet(TinyNet(), cz.analyze(TinyNet(), torch.randn(1, 3, 16, 16))),
                          quadrant_data(64), method=uniform, steps=1, progress=False)
