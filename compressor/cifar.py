"""CIFAR-10 ResNets (He et al. 2016) that load the shared pretrained checkpoints exactly.

The originals downsample their shortcut without parameters ("option A": take every second
pixel, zero-pad C/2 channels on each side). That ties the middle half of the wider stage to the
narrower stage in a way a dependency tracer cannot see. Here that shortcut is an ordinary 1x1
stride-2 convolution whose fixed weight is the identity in the middle rows: the same output,
and a graph that channel pruning understands.
"""
import torch
from torch import nn
from torch.nn import functional as F

from .data import data_dir
from .errors import ConfigError

PRETRAINED = {"resnet20": "resnet20-12fca82f.th", "resnet56": "resnet56-4bfd9763.th"}


def option_a_shortcut(in_channels, out_channels):
    """A frozen 1x1 stride-2 conv equal to option A: input channel i -> output (out-in)/2 + i."""
    conv = nn.Conv2d(in_channels, out_channels, 1, stride=2, bias=False)
    conv.weight.requires_grad_(False)
    reset_shortcut(conv)
    return conv


def reset_shortcut(conv):
    """Set a shortcut conv's weight back to the middle-rows identity."""
    out_channels, in_channels = conv.weight.shape[:2]
    offset = (out_channels - in_channels) // 2
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[offset:offset + in_channels, :, 0, 0] = torch.eye(in_channels)


class BasicBlock(nn.Module):
    def __init__(self, in_channels, channels, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        downsample = stride != 1 or in_channels != channels
        self.shortcut = option_a_shortcut(in_channels, channels) if downsample else nn.Identity()

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """conv1/bn1, three stages of `blocks` basic blocks (16, 32, 64 channels), pool, linear."""

    def __init__(self, blocks, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._stage(16, 16, blocks, stride=1)
        self.layer2 = self._stage(16, 32, blocks, stride=2)
        self.layer3 = self._stage(32, 64, blocks, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(64, num_classes)
        for name, module in self.named_modules():  # the original's init; shortcuts stay fixed
            if isinstance(module, (nn.Conv2d, nn.Linear)) and not name.endswith("shortcut"):
                nn.init.kaiming_normal_(module.weight)

    @staticmethod
    def _stage(in_channels, channels, blocks, stride):
        first = BasicBlock(in_channels, channels, stride)
        return nn.Sequential(first, *(BasicBlock(channels, channels) for _ in range(blocks - 1)))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.linear(torch.flatten(self.pool(out), 1))


def resnet20(num_classes=10):
    return CifarResNet(3, num_classes)


def resnet56(num_classes=10):
    return CifarResNet(9, num_classes)


def pretrained_path(name, root=None):
    """Path of the pretrained checkpoint `name` ('resnet20' or 'resnet56') in the data folder."""
    if name not in PRETRAINED:
        raise ConfigError(f"no pretrained weights named '{name}': expected one of {', '.join(PRETRAINED)}")
    path = data_dir(root) / "pretrained" / PRETRAINED[name]
    if not path.is_file():
        raise FileNotFoundError(
            f"pretrained weights not found: '{path}' is missing (pass root= or set COMPRESSOR_DATA)"
        )
    return path


def load_pretrained(model, path):
    """Load a checkpoint into `model` exactly; returns `model`.

    Accepts `{"state_dict": ...}` or a bare state dict, with or without DataParallel's `module.`
    prefix. Every checkpoint key must match the model by name and shape, and every model entry
    must come from the checkpoint, except the shortcut weights (reset to the identity) and
    `num_batches_tracked` (which the original checkpoints lack).
    """
    saved = torch.load(path, map_location="cpu", weights_only=True)
    saved = saved.get("state_dict", saved)
    state = {key.removeprefix("module."): value for key, value in saved.items()}
    shortcuts = {name: m for name, m in model.named_modules()
                 if name.endswith(".shortcut") and isinstance(m, nn.Conv2d)}
    optional = {f"{name}.weight" for name in shortcuts}
    own = model.state_dict()
    missing = [k for k in own if k not in state and k not in optional
               and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
                  if k in own and v.shape != own[k].shape]
    if missing or unexpected or mismatched:
        raise ConfigError(
            f"checkpoint '{path}' does not match {type(model).__name__}: "
            f"missing {missing or 'none'}; unexpected {unexpected or 'none'}; "
            f"shape mismatch (checkpoint vs model) {mismatched or 'none'}"
        )
    model.load_state_dict(state, strict=False)
    for conv in shortcuts.values():
        reset_shortcut(conv)
    return model
