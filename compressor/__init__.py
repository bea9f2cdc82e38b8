"""compressor: BCNet width search and physical slimming for pretrained PyTorch CNNs."""
__version__ = "0.1.0"

from .errors import CompressorError, ConfigError, InfeasibleBudgetError, UnsupportedModelError  # noqa: E402
from .groups import ChannelGroup, Member  # noqa: E402
from .cost import count_params, measure_flops  # noqa: E402
from .space import WidthSpace, analyze  # noqa: E402
from .supernet import Supernet, supernet  # noqa: E402
from .slim import load_slim, save_slim, slim  # noqa: E402
from .models import load_model  # noqa: E402
from .train import TrainResult, train_supernet  # noqa: E402
