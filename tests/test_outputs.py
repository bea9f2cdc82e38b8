"""compress()'s output folder: a reused out_dir never returns another run's model, model.pt is
written for models built the usual way (or the run fails before training), every artifact is
written together, stale artifacts and temporaries are removed, checkpoints only kept on request."""
import json
import os
import time

import pytest
import torch
import torchvision

import compressor as cz
from compressor.train import CHECKPOINT
from conftest import TinyNet, assert_unchanged, quadrant_data, snapshot

FAST = dict(supernet_epochs=1, finetune_epochs=0, batch_size=32, effort=0.05, bins=10, divisor=1, progress=False)
SUPERNET = dict(FAST, method="bcnet")


def tiny(seed=0, width=8):
    torch.manual_seed(seed)
    return TinyNet(width=width)


def state_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_reused_out_dir_never_returns_the_previous_run(tmp_path):
    """A supernet method's checkpoint in a reused out_dir: another run's is refused, the same run's resumed."""
    out = str(tmp_path)
    first = cz.compress(tiny(), "flops<=50%", quadrant_data(256), out_dir=out, keep_checkpoints=True, **SUPERNET)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["paths"]["checkpoints"] == str(tmp_path / "checkpoints")
    for model, data, budget, differ in [
            # compress distils from the original by default, so another model is another teacher too; other
            # weights rank channels otherwise, so the importance-seeded anchors may differ as well
            (tiny(seed=1), quadrant_data(256), "flops<=50%",
             r"the model weights, the distillation teacher(, anchors \(.*\))? differ"),
            (tiny(width=16), quadrant_data(256), "flops<=50%",
             # another architecture has other seed configurations: the supernet's anchors differ too
             r"the model architecture, the model weights, the distillation teacher, anchors \(.*\) differ"),
            (tiny(), quadrant_data(256, seed=2), "flops<=50%", "the training data differ"),
            (tiny(), quadrant_data(256), "flops<=40%",
             r"anchors \(.*\), budget \('flops<=50%' then, 'flops<=40%' now\) differ")]:
        with pytest.raises(cz.ConfigError, match=f"checkpoint of another run: {differ}.*restart=True"):
            cz.compress(model, budget, data, out_dir=out, keep_checkpoints=True, **SUPERNET)
    assert (tmp_path / "checkpoints" / CHECKPOINT).exists() and (tmp_path / "model.pt").exists()  # left as they were

    again = cz.compress(tiny(), "flops<=50%", quadrant_data(256), out_dir=out, keep_checkpoints=True, **SUPERNET)
    assert again.widths == first.widths and state_equal(again.model.state_dict(), first.model.state_dict())

    other = cz.compress(tiny(seed=1), "flops<=50%", quadrant_data(256), out_dir=out, restart=True, **SUPERNET)
    fresh = cz.compress(tiny(seed=1), "flops<=50%", quadrant_data(256), **SUPERNET)  # the same run, no out_dir
    assert state_equal(other.model.state_dict(), fresh.model.state_dict())
    assert not state_equal(other.model.state_dict(), first.model.state_dict())
    assert not (tmp_path / "checkpoints").exists()  # removed after success by default
    assert "checkpoints" not in json.loads((tmp_path / "report.json").read_text())["paths"]


def test_torchvision_and_data_parallel_models_get_a_model_pt(tmp_path):
    model = torch.nn.DataParallel(torchvision.models.resnet18(num_classes=4))
    before = snapshot(model)
    result = cz.compress(model, "flops<=60%", quadrant_data(64, size=32), out_dir=str(tmp_path),
                         **dict(FAST, batch_size=16, divisor=8))
    assert_unchanged(model, before)
    loaded = cz.load_slim(str(tmp_path / "model.pt")).eval()  # a known builder: no trust needed
    assert loaded.compressor_info["source"] == "torchvision:resnet18(num_classes=4)"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), result.model.eval()(x))


class Unnamed(torch.nn.Module):
    """A class that needs constructor arguments and no builder names."""

    def __init__(self, width):
        super().__init__()
        self.net = TinyNet(width=width)

    def forward(self, x):
        return self.net(x)


def test_an_unnameable_model_fails_before_training(tmp_path):
    t = time.time()
    with pytest.raises(cz.ConfigError, match="cannot name the architecture of Unnamed.*source=.*Nothing was trained"):
        cz.compress(Unnamed(8), "flops<=50%", quadrant_data(256), out_dir=str(tmp_path), **FAST)
    assert time.time() - t < 10 and os.listdir(tmp_path) == []
    factory = tmp_path.parent / f"{tmp_path.name}_factory.py"
    factory.write_text(f"import sys\nsys.path.insert(0, {os.path.dirname(__file__)!r})\n"
                       "from test_outputs import Unnamed\ndef build():\n    return Unnamed(8)\n")
    cz.compress(Unnamed(8), "flops<=50%", quadrant_data(256), out_dir=str(tmp_path), source=f"{factory}:build", **FAST)
    assert cz.load_slim(str(tmp_path / "model.pt"), trust_source=True).compressor_info["source"] == f"{factory}:build"


def test_stale_artifacts_and_temporaries_are_removed(tmp_path):
    for name in ("model.onnx", "model-fp16.engine", ".model.pt.0123abcd.tmp", "notes.txt"):
        (tmp_path / name).write_text("from an earlier run")
    (tmp_path / ".staging-dead").mkdir()
    (tmp_path / ".staging-dead" / "model.pt").write_text("killed mid-write")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / f".{CHECKPOINT}.89abcdef.tmp").write_bytes(b"half a checkpoint")
    result = cz.compress(tiny(), "flops<=50%", quadrant_data(256), out_dir=str(tmp_path), **FAST)
    assert sorted(os.listdir(tmp_path)) == ["model.pt", "notes.txt", "pareto.png", "report.json"]
    assert (tmp_path / "notes.txt").read_text() == "from an earlier run"  # not an artifact: the user's
    assert set(result.paths) == {"model", "pareto", "report"}


def test_a_failing_run_leaves_the_previous_outputs(tmp_path):
    cz.compress(tiny(), "flops<=50%", quadrant_data(256), out_dir=str(tmp_path), export=["onnx"], **FAST)

    def files():
        return {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path) if (tmp_path / f).is_file()}

    before = files()
    assert sorted(before) == ["model.onnx", "model.pt", "pareto.png", "report.json"]

    class Unreadable(torch.utils.data.Dataset):
        """Validation data whose items cannot be read: the run fails after the search."""
        def __len__(self):
            return 4

        def __getitem__(self, i):
            raise IndexError(i)

    with pytest.raises((IndexError, cz.CompressorError)):
        cz.compress(tiny(seed=1), "flops<=50%", quadrant_data(256), Unreadable(), out_dir=str(tmp_path), **FAST)
    assert files() == before and not [f for f in os.listdir(tmp_path) if f.startswith(".")]
