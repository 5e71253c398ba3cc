"""Datasets as numpy arrays: CIFAR-10/100, a synthetic stand-in, and folders of the user's images."""

from kdlab.data.datasets import DataIdentity, Dataset, Split, default_data_dir, identify_dataset, load_dataset
from kdlab.data.synthetic import write_synthetic_cifar

__all__ = ["DataIdentity", "Dataset", "Split", "default_data_dir", "identify_dataset", "load_dataset",
           "write_synthetic_cifar"]
