"""Installs the E3VA package (``projects/E3VA/e3va``) so that it imports as ``e3va``.

Detectron2 is deliberately not listed in ``install_requires``: it is not on PyPI under its own name.
``tools/install.sh`` (called by ``make``) installs it first, keeping an official build where one exists.
"""
from setuptools import find_packages, setup

setup(
    name="e3va-detectron2",
    version="0.1.0",
    description="E3VA: parameter-, memory- and time-efficient visual adapters for Detectron2",
    package_dir={"": "projects/E3VA"},
    packages=find_packages("projects/E3VA"),
    package_data={"e3va": ["weights/*.pth"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.0",
        "filelock",  # e3va.atomic.file_lock; torch depends on it too
        "torchvision",
        "timm>=1.0,<1.1",
        "numpy",
        "opencv-python-headless",
    ],
)
