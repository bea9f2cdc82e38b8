"""compress()'s options as one CompressConfig: validated before any data is read, and the CLI
builds the same one."""
import pytest
import torch

import compressor as cz
from compressor.cli import build_parser, compress_config
from compressor.config import CompressConfig
from conftest import TinyNet


def test_the_cli_builds_the_config_compress_builds():
    args = build_parser().parse_args(["compress", "--model", "m.py:f", "--data", "d", "--budget", "flops<=50%",
                                      "--out", "o"])
    assert compress_config(args) == CompressConfig.build()
    args = build_parser().parse_args(["compress", "--model", "m.py:f", "--data", "d", "--budget", "flops<=50%",
                                      "--out", "o", "--effort", "0.5", "--no-distill", "--method", "ua",
                                      "--method-option", "n_random=3", "--export", "onnx,trt-fp16"])
    assert compress_config(args) == CompressConfig.build(effort=0.5, distill=False, method="ua",
                                                         method_options={"n_random": 3}, export=("onnx", "trt-fp16"))


class Unreadable(torch.utils.data.Dataset):
    """Any read fails the test: a wrong option must be refused before the data is touched."""

    def __len__(self):
        return 100

    def __getitem__(self, i):
        raise AssertionError("the data was read before the options were checked")


@pytest.mark.parametrize("options, message", [
    ({"efort": 0.1}, "unknown option 'efort' for compress\\(\\): valid options are method, method_options"),
    ({"supernet_window": 1.5}, "supernet_window must be a fraction of the budget in \\(0, 1\\]"),
    ({"score_original": True, "inherit": "supernet"}, 'inherit="supernet" never slims from them'),
    ({"export": "tflite"}, "unknown export format 'tflite': use onnx, trt-fp32, trt-fp16 or trt-int8"),
    ({"effort": 0}, "effort must be a number > 0"),
    ({"calib_batches": 0}, "calib_batches must be an integer > 0"),
    ({"score_metric": "top-1"}, "unknown score_metric 'top-1'"),
])
def test_a_wrong_option_is_refused_before_the_data_is_read(options, message):
    with pytest.raises(cz.ConfigError, match=message):
        cz.compress(TinyNet(), "flops<=50%", Unreadable(), **options)


def test_a_config_and_options_over_it():
    base = CompressConfig.build(effort=0.5, seed=3)
    assert CompressConfig.build(base, seed=4) == CompressConfig.build(effort=0.5, seed=4)
    assert "export" not in base.identity() and base.identity()["effort"] == 0.5


def test_the_torch_free_conv_impls_match_the_kernels():
    from compressor.config import CONV_IMPLS
    from compressor.kernels import IMPLS
    assert set(CONV_IMPLS) == set(IMPLS)


def test_binnings_match_the_space():
    from compressor.config import BINNINGS
    from compressor.space import BINNINGS as SPACE_BINNINGS
    assert BINNINGS == SPACE_BINNINGS
