"""Built-in datasets, all generated or bundled offline (scikit-learn's bundled sets and MNIST-1D)."""
from __future__ import annotations

import numpy as np

from .raw import RawDataset


def digits() -> RawDataset:
    """scikit-learn's 1,797 8x8 handwritten digits (UCI), scaled to [0, 1], shape (1, 8, 8)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None, :, :]
    return RawDataset(x, d.target.astype(np.int64), "classification", "image",
                      class_names=[str(c) for c in d.target_names])


def mnist1d(num_samples: int = 5000, train_split: float = 0.8, seed: int = 42) -> RawDataset:
    """MNIST-1D (Greydanus 2020, arXiv 2011.14439): length-40 signals, 10 classes, shape (1, 40).

    Generated locally with the package's own procedure (never its download). The defaults give the
    published 4,000/1,000 train/test split. `seed` is the generator's: MNIST-1D draws each class's
    signals from one seeded stream, so sets of any size made with the same seed share their first
    signals of every class (each set standardised on its own, so not byte-equal). A pretraining or
    unlabelled pool meant to be disjoint from the published set needs another seed."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples, args.train_split, args.seed = num_samples, train_split, seed
    d = make_dataset(args)
    as_x = lambda a: np.asarray(a, dtype=np.float32)[:, None, :]  # noqa: E731
    return RawDataset(as_x(d["x"]), np.asarray(d["y"], dtype=np.int64), "classification", "sequence",
                      class_names=[str(i) for i in range(10)],
                      x_test=as_x(d["x_test"]), y_test=np.asarray(d["y_test"], dtype=np.int64))


def _sklearn_table(loader, task_type: str) -> RawDataset:
    d = loader()
    y = d.target.astype(np.int64 if task_type == "classification" else np.float32)
    names = [str(c) for c in getattr(d, "target_names", [])] if task_type == "classification" else []
    return RawDataset(d.data.astype(np.float32), y, task_type, "tabular", class_names=names,
                      feature_names=[str(f) for f in d.feature_names])


def breast_cancer() -> RawDataset:
    """scikit-learn's Wisconsin breast cancer table: 569 rows, 30 features, 2 classes."""
    from sklearn.datasets import load_breast_cancer
    return _sklearn_table(load_breast_cancer, "classification")


def wine() -> RawDataset:
    """scikit-learn's wine table: 178 rows, 13 features, 3 classes."""
    from sklearn.datasets import load_wine
    return _sklearn_table(load_wine, "classification")


def iris() -> RawDataset:
    """scikit-learn's iris table: 150 rows, 4 features, 3 classes."""
    from sklearn.datasets import load_iris
    return _sklearn_table(load_iris, "classification")


def diabetes() -> RawDataset:
    """scikit-learn's diabetes table (regression): 442 rows, 10 features, one target."""
    from sklearn.datasets import load_diabetes
    return _sklearn_table(load_diabetes, "regression")


def synthetic_tabular(n_samples: int = 2000, n_features: int = 20, n_informative: int = 10,
                      n_classes: int = 3, class_sep: float = 1.0, flip_y: float = 0.01,
                      seed: int = 0) -> RawDataset:
    """scikit-learn's make_classification (Guyon 2003 design): Gaussian clusters on a hypercube."""
    from sklearn.datasets import make_classification

    x, y = make_classification(n_samples=n_samples, n_features=n_features, n_informative=n_informative,
                               n_redundant=min(2, n_features - n_informative), n_classes=n_classes,
                               class_sep=class_sep, flip_y=flip_y, random_state=seed)
    return RawDataset(x.astype(np.float32), y.astype(np.int64), "classification", "tabular",
                      class_names=[str(i) for i in range(n_classes)],
                      feature_names=[f"f{i}" for i in range(n_features)])
