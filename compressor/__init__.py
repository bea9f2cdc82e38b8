"""compressor: BCNet width search and physical slimming for pretrained PyTorch CNNs."""
from ._version import __version__  # noqa: F401

from .errors import CompressorError, ConfigError, InfeasibleBudgetError, UnsupportedModelError  # noqa: E402
from .groups import ChannelGroup, Member  # noqa: E402
from .cost import count_params, measure_flops  # noqa: E402
from .space import WidthSpace, analyze  # noqa: E402
from .supernet import Supernet, supernet  # noqa: E402
from .slim import load_slim, order_channels, save_slim, slim  # noqa: E402
from .models import load_model  # noqa: E402
from .budget import Budget, Constraint, parse_budget  # noqa: E402
from .train import TrainResult, train_supernet  # noqa: E402
from .search import SearchResult, recalibrate_bn, score, search, uniform_baseline  # noqa: E402
from .finetune import accuracy, finetune  # noqa: E402
from .api import CompressionResult, compress  # noqa: E402
