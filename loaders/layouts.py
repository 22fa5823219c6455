"""How CIFAR's python-format folders are laid out: where each dataset is published, which
files a folder holds, and the layout of the folders this project writes itself."""

from __future__ import annotations

from dataclasses import dataclass, replace

ROW_SIZE = 32 * 32 * 3  # one image: R, G and B planes of 32 x 32 bytes


@dataclass(frozen=True)
class Layout:
    """Where a dataset lives on the web and how its python-format folder is organised."""

    url: str | None
    md5: str | None
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    names_key: bytes
    labels_key: bytes


LAYOUTS = {
    "cifar10": Layout(
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        md5="c58f30108f718f92721af3b95e74349a",
        folder="cifar-10-batches-py",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_files=("test_batch",),
        meta_file="batches.meta",
        names_key=b"label_names",
        labels_key=b"labels",
    ),
    "cifar100": Layout(
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        md5="eb9058c3a382ffc7106e4002c42a8d85",
        folder="cifar-100-python",
        train_files=("train",),
        test_files=("test",),
        meta_file="meta",
        names_key=b"fine_label_names",
        labels_key=b"fine_labels",
    ),
}
# the layout of the python-format folders this project writes (synthetic data, image folders):
# CIFAR-10's, so they read as CIFAR-10 does; they are made here, never downloaded
OWN_LAYOUT = replace(LAYOUTS["cifar10"], url=None, md5=None, folder="")
