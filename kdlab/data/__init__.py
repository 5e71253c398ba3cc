"""Datasets as numpy arrays: CIFAR-10/100, a synthetic stand-in, and folders of the user's images."""

from kdlab.data.datasets import Dataset, Split, default_data_dir, load_dataset
from kdlab.data.synthetic import write_synthetic_cifar

__all__ = ["Dataset", "Split", "default_data_dir", "load_dataset", "write_synthetic_cifar"]
