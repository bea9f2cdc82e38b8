import pytest
import torch
from torch.nn import functional as F

from compressor import cifar, data
from compressor.errors import ConfigError

# Trainable parameters of the CIFAR ResNets (He et al. 2016: 0.27 M and 0.85 M).
PARAMETERS = {"resnet20": 269_722, "resnet56": 853_018}


def option_a(x, out_channels):
    """The original parameter-free shortcut: every second pixel, C/2 zero channels each side."""
    pad = (out_channels - x.shape[1]) // 2
    return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, pad, pad))


def reference_forward(model, x):
    """The original network's forward, using `model`'s layers but option-A shortcuts."""
    out = F.relu(model.bn1(model.conv1(x)))
    for stage in (model.layer1, model.layer2, model.layer3):
        for block in stage:
            residual = F.relu(block.bn1(block.conv1(out)))
            residual = block.bn2(block.conv2(residual))
            shortcut = out if residual.shape == out.shape else option_a(out, residual.shape[1])
            out = F.relu(residual + shortcut)
    return model.linear(out.mean((2, 3)))


def _randomise_batch_norm(model):
    torch.manual_seed(0)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 1.5)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.normal_(0, 0.1)
    return model.eval()


def _checkpoint(name):
    path = data.data_dir() / "pretrained" / cifar.PRETRAINED[name]
    if not path.is_file():
        pytest.skip(f"needs the shared pretrained weights: '{path}' is missing")
    return path


@pytest.mark.parametrize("channels, size", [(16, 32), (32, 16), (16, 15)])
def test_shortcut_equals_option_a(channels, size):
    conv = cifar.option_a_shortcut(channels, 2 * channels)
    x = torch.randn(4, channels, size, size)
    torch.testing.assert_close(conv(x), option_a(x, 2 * channels), rtol=0, atol=0)
    weight = conv.weight[:, :, 0, 0]
    assert torch.equal(weight[channels // 2:3 * channels // 2], torch.eye(channels))
    assert weight.abs().sum() == channels  # nothing outside the middle rows


@pytest.mark.parametrize("factory", [cifar.resnet20, cifar.resnet56])
def test_model_equals_the_option_a_network(factory):
    model = _randomise_batch_norm(factory())
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference_forward(model, x), rtol=1e-5, atol=1e-5)


def test_shortcuts_are_plain_frozen_convolutions():
    model = cifar.resnet20()
    shortcuts = {n: m for n, m in model.named_modules() if n.endswith("shortcut")}
    assert set(shortcuts) == {f"layer{s}.{b}.shortcut" for s in (1, 2, 3) for b in range(3)}
    convs = {n for n, m in shortcuts.items() if isinstance(m, torch.nn.Conv2d)}
    assert convs == {"layer2.0.shortcut", "layer3.0.shortcut"}
    assert all(type(m) is torch.nn.Identity for n, m in shortcuts.items() if n not in convs)
    assert all(not shortcuts[n].weight.requires_grad for n in convs)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(shortcuts[n].weight.grad is None for n in convs)
    assert model.conv1.weight.grad is not None


@pytest.mark.parametrize("name", ["resnet20", "resnet56"])
def test_trainable_parameters_match_the_paper(name):
    model = getattr(cifar, name)()
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == PARAMETERS[name]


@pytest.mark.parametrize("name", ["resnet20", "resnet56"])
def test_pretrained_checkpoint_loads_exactly(name):
    path = _checkpoint(name)
    assert cifar.pretrained_path(name) == path
    model = cifar.load_pretrained(getattr(cifar, name)(), path)
    saved = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    state = model.state_dict()
    for key, value in saved.items():
        assert torch.equal(state[key.removeprefix("module.")], value), key
    loaded = {key.removeprefix("module.") for key in saved}
    rest = {k for k in state if k not in loaded}
    assert rest == {k for k in state if k.endswith("num_batches_tracked")} | {
        "layer2.0.shortcut.weight", "layer3.0.shortcut.weight"}
    fresh = cifar.option_a_shortcut(32, 64).weight
    assert torch.equal(state["layer3.0.shortcut.weight"], fresh)


def test_shortcut_weights_are_reset_on_load(tmp_path):
    model = cifar.resnet20()
    path = tmp_path / "own.pt"
    torch.save(model.state_dict(), path)  # a bare state dict without 'module.'
    other = cifar.resnet20()
    other.layer2[0].shortcut.weight.data.fill_(1.0)
    cifar.load_pretrained(other, path)
    for key, value in model.state_dict().items():
        assert torch.equal(other.state_dict()[key], value), key


def test_mismatched_checkpoint_names_the_keys(tmp_path):
    path = _checkpoint("resnet56")
    with pytest.raises(ConfigError, match=r"unexpected \[.*'layer1\.3\.conv1\.weight'"):
        cifar.load_pretrained(cifar.resnet20(), path)
    with pytest.raises(ConfigError, match=r"linear\.weight \(10, 64\) vs \(100, 64\)"):
        cifar.load_pretrained(cifar.resnet56(num_classes=100), path)
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    del state["module.linear.bias"]
    torch.save({"state_dict": state}, tmp_path / "truncated.th")
    with pytest.raises(ConfigError, match=r"missing \['linear\.bias'\]"):
        cifar.load_pretrained(cifar.resnet56(), tmp_path / "truncated.th")


def test_pretrained_path_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="resnet56-4bfd9763.th' is missing"):
        cifar.pretrained_path("resnet56", root=tmp_path)
    with pytest.raises(ConfigError, match="no pretrained weights named 'resnet18'"):
        cifar.pretrained_path("resnet18")


@pytest.mark.parametrize("name, minimum", [("resnet20", 0.78), ("resnet56", 0.80)])
def test_pretrained_accuracy_on_the_jpeg_test_split(name, minimum):
    tarball = data.data_dir() / data.TARBALL
    if not tarball.is_file():
        pytest.skip(f"needs the shared CIFAR-10 data: '{tarball}' is missing")
    model = cifar.load_pretrained(getattr(cifar, name)(), _checkpoint(name)).eval()
    model = model.to(memory_format=torch.channels_last)  # about 30 % faster on CPU
    test = data.cifar10("test")
    correct = 0
    with torch.inference_mode():
        for start in range(0, len(test), 500):
            batch = data.normalize(test.images[start:start + 500])
            prediction = model(batch.to(memory_format=torch.channels_last)).argmax(1)
            correct += (prediction == test.labels[start:start + 500]).sum().item()
    assert correct / len(test) >= minimum, f"{name}: top-1 {correct / len(test):.4f}"
