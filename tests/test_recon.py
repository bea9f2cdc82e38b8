"""The default method, "recon" (compressor/methods/recon.py): reconstruction-scored candidates around
the better seed configuration, the anchor guard, the supernet's epochs spent fine-tuning, and a
latency budget measured on the target through compress()'s delivery loop."""
import json
import os
import subprocess

import numpy as np
import pytest
import torch

import compressor as cz
from compressor.config import CompressConfig
from compressor.methods import get_method
from conftest import assert_unchanged, quadrant_data, snapshot, tiny_compress_cli


def test_recon_is_the_default_and_refuses_bad_options():
    assert CompressConfig().method == "recon"
    spec = get_method("recon")
    assert spec.fit is not None and spec.finetunes_supernet_epochs and spec.sides == ("left",)
    with pytest.raises(cz.ConfigError, match="recon option local must be an integer >= 0"):
        spec.parse_options({"local": -1})
    with pytest.raises(cz.ConfigError, match="recon option batches must be an integer >= 1"):
        spec.parse_options({"batches": 0})
    with pytest.raises(cz.ConfigError, match='method "recon" and .* start from them'):
        CompressConfig(seed_population=False)


def test_recon_compresses_within_the_budget_and_records_its_candidates(pretrained):
    before = snapshot(pretrained)
    result = cz.compress(pretrained, "flops<=50%", quadrant_data(256), quadrant_data(128, seed=5), batch_size=32,
                         supernet_epochs=0.5, finetune_epochs=0.5, bins=8, divisor=1, progress=False,
                         method_options={"local": 3, "generations": 2, "batches": 4})
    assert_unchanged(pretrained, before)
    assert result.method == "recon" and result.side == "left" and result.meets_budget()
    assert result.search["inherited"] in ("reconstructed, importance order", "reconstructed, model order")
    history = result.search["history"]
    scored = {tuple(e["cfg"]) for e in history}
    assert tuple(result.widths) in scored
    # the uniform seed is scored in both channel orders (importance, the model's own), nothing else twice
    assert len(history) == len(scored) + 1
    assert {e["generation"] for e in history} >= {0, 1}  # seeds, then local moves
    assert result.original["accuracy"] - result.result["accuracy"] < 0.15
    # the supernet's 0.5 epochs were spent fine-tuning: no supernet stage was timed
    assert "supernet_s" not in result.timings and result.timings["finetune_s"] > 0


def test_the_anchor_guard_keeps_the_anchor_unless_a_candidate_is_clearly_better():
    from compressor.methods.recon import _search
    from compressor.methods import FitContext
    from compressor.search import GUARD_Z, constraints

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 2))
    space = cz.analyze(model, torch.randn(1, 3, 8, 8), bins=8, divisor=1)
    ctx = FitContext(model=model, space=space, train_data=None, held_out=None, budget=cz.parse_budget("flops<=100%"),
                     method=get_method("recon"), options=get_method("recon").options(), seeds=[(6,), (5,)])

    class Fixed:  # held-out samples chosen per configuration: what the guard sees
        def __init__(self, samples):
            self.samples, self.history, self.bounds = {}, [], constraints(space, ctx.budget)
            self.table = samples

        def score(self, key, generation):  # key: (channel order, configuration)
            self.samples.setdefault(key, self.table(key[1]))
            return float(self.samples[key].mean())

    n = 400
    rng = np.random.default_rng(0)
    anchor = torch.tensor((rng.random(n) < 0.7).astype(float))
    options = get_method("recon").options(local=4, generations=1)
    worse = torch.where(torch.arange(n) < 40, torch.zeros(n), anchor)

    def table(flipped):  # seed (6,) is the anchor, narrower is worse, wider has `flipped` wrong samples made right
        better = anchor.clone()
        better[(anchor == 0).nonzero()[:flipped]] = 1.0
        return lambda cfg: anchor if cfg == (6,) else worse if cfg < (6,) else better

    slightly, _ = _search(ctx, Fixed(table(3)), options)
    assert slightly.cfg == (6,) and slightly.guard["delivered"] == "anchor" and slightly.guard["anchor"] == [6]
    assert 0 < slightly.guard["difference"] <= GUARD_Z * slightly.guard["standard_error"]
    clearly, key = _search(ctx, Fixed(table(60)), options)
    assert clearly.cfg > (6,) and clearly.guard["delivered"] == "search" and key == ("importance", clearly.cfg)


def test_recon_meets_a_latency_budget_measured_on_the_target(pretrained, tmp_path):
    """A latency budget: the candidates are ranked within the latency model's prediction, and the
    delivered model is measured on the target (torch-cpu) by compress()'s delivery loop, at the
    deployment batch latency_options gives (4 images a call; the costs stay per sample). The limit
    is loose (TinyNet's latency is mostly per-layer overhead, and on a loaded machine its smallest
    configuration has measured slower than the original): what is tested is the loop."""
    result = cz.compress(pretrained, "flops<=60%,latency<=50ms@torch-cpu", quadrant_data(128), batch_size=32,
                         supernet_epochs=0.25,
                         finetune_epochs=0.25, bins=8, divisor=1, progress=False,
                         latency_options=dict(cache_dir=str(tmp_path), points=3, calibration=4, batch=4))
    cached, = [json.load(open(path))["key"] for path in tmp_path.glob("torch-cpu-*.json")]
    assert cached["batch"] == 4 and ":b4:" in cached["target"]  # every timing of the run at batch 4
    attempts = result.search["latency_attempts"]
    assert attempts and attempts[0]["measured_us"] > 0
    assert all(a["predicted_us"] <= a["limit_us"] for a in attempts)
    assert attempts[-1]["measured_us"] <= result.limits["latency"]


def test_cli_latency_batch_times_the_deployment_batch(tmp_path):
    """`compressor compress --latency-batch 2`: the latency table and checks time 2 images a call."""
    cli = tiny_compress_cli(tmp_path, "recon", "latency<=100ms@torch-cpu") + ["--latency-batch", "2"]
    run = subprocess.run(cli, capture_output=True, text=True, env=dict(os.environ, COMPRESSOR_CACHE=str(tmp_path / "cache")))
    assert run.returncode == 0, run.stderr
    cached, = [json.load(open(path))["key"] for path in (tmp_path / "cache" / "latency").glob("torch-cpu-*.json")]
    assert cached["batch"] == 2 and ":b2:" in cached["target"]
    assert json.loads(run.stdout)["result"]["latency"] <= 100_000
