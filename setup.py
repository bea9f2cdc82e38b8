from setuptools import setup

# One import root: kernels/ and exporters/ install as compressor.kernels and compressor.exporters,
# never as top-level packages (other published distributions use those names).
setup(
    name="compressor",
    version="0.1.0",
    description="BCNet width search and physical slimming for pretrained PyTorch CNNs",
    python_requires=">=3.10",
    packages=["compressor", "compressor.kernels", "compressor.exporters"],
    package_dir={
        "compressor": "compressor",
        "compressor.kernels": "kernels",
        "compressor.exporters": "exporters",
    },
    package_data={"compressor.kernels": ["csrc/*.cu", "csrc/*.cuh", "csrc/*.cpp", "csrc/*.h"]},
    install_requires=[
        "torch>=2.3",
        "torchvision>=0.18",
        "numpy",
        "torch-pruning>=1.5",
        "onnx",
        "onnxruntime",
        "onnxscript",  # torch.onnx's dynamo exporter
        "tqdm",
        "matplotlib",
    ],
    extras_require={
        "trt": ["tensorrt>=10,<11", "pycuda"],
        "dev": ["pytest", "pytest-timeout", "hypothesis", "ninja"],
    },
    entry_points={"console_scripts": ["compressor=compressor.cli:main"]},
)
