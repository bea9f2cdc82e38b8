from setuptools import find_packages, setup

# One import root: kernels/ and exporters/ install as compressor.kernels and compressor.exporters,
# never as top-level packages (other published distributions use those names).
ROOTS = {"compressor": "compressor", "compressor.kernels": "kernels", "compressor.exporters": "exporters"}

setup(
    name="compressor",
    version="0.1.0",
    description="BCNet width search and physical slimming for pretrained PyTorch CNNs",
    python_requires=">=3.10",
    # every subpackage of the three folders, found rather than listed (a hand list once left out
    # compressor.latency and broke every non-editable install)
    packages=[p for name, folder in ROOTS.items() for p in [name] + [f"{name}.{sub}" for sub in find_packages(folder)]],
    package_dir=ROOTS,
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
        "dev": ["pytest", "pytest-timeout", "hypothesis", "ninja", "timm"],
    },
    entry_points={"console_scripts": ["compressor=compressor.cli:main"]},
)
