"""Build script for otprune (pure Python package; the compiled extension is optional)."""

from setuptools import find_packages, setup

setup(
    name="otprune",
    version="0.1.0",
    description="Fast, faithful OTPrune visual-token pruning for multimodal LLMs",
    packages=find_packages(include=["otprune", "otprune.*", "triton_kernels", "triton_kernels.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.1", "numpy"],
    entry_points={"console_scripts": ["otprune=otprune.cli:main"]},
)
