"""Datasets (built-in, offline) and user files, split into train/val/test, served as in-memory batches."""
from .bundle import DataBundle, DataInfo, Split, load_data
from .builtin import breast_cancer, diabetes, digits, iris, mnist1d, synthetic_tabular, wine
from .files import csv, npz
from .loader import TensorLoader

# name -> factory returning a RawDataset; registered for recipes in torchdojo.registry.
DATASETS = {
    "digits": digits,
    "mnist1d": mnist1d,
    "breast_cancer": breast_cancer,
    "wine": wine,
    "iris": iris,
    "diabetes": diabetes,
    "synthetic_tabular": synthetic_tabular,
    "csv": csv,
    "npz": npz,
}

__all__ = ["DATASETS", "DataBundle", "DataInfo", "Split", "TensorLoader", "load_data"]
