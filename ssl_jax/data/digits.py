"""The built-in offline dataset: scikit-learn's handwritten digits as a TFDS builder.

`sklearn.datasets.load_digits` ships with scikit-learn: 1,797 real 8x8 grayscale images of
the digits 0-9 (UCI "Optical Recognition of Handwritten Digits", pixel values 0..16). This
builder writes them once, as ArrayRecord, into a TFDS data dir so that the built-in data
travels the same `tfds.data_source` -> Grain path as CIFAR-10 or ImageNet. Preparing needs
neither a network nor TensorFlow: pixels are stored as a `Tensor(shape=(8, 8, 1), uint8)`
(an `Image` feature would need TensorFlow to encode).

Features: `image` uint8 `[8, 8, 1]`, pixel `round(p * 255 / 16)` so 0..16 maps onto 0..255;
`label` `ClassLabel(10)` with names '0'..'9'.

Split (fixed, stratified, independent of library versions): within each class, examples are
ordered by `sha256(f"ssl_jax_digits:{SPLIT_SEED}:{index}")` of their index in
`load_digits()`, and the first `k_c` go to `test`, where the per-class counts `k_c` are the
largest-remainder apportionment of 360 test examples to the class sizes (`n_c * 360 / 1797`).
Result: 1,437 train / 360 test, every class 20 % test to within one example.

Concurrency: two processes (or hosts sharing a file system) may call `prepare` at once. TFDS
writes into a temporary `incomplete.*` dir and renames it into place, but the loser of that
race would fail on the rename, so preparation holds an exclusive `fcntl` lock on
`DATA_DIR/ssl_jax_digits.lock`; the second process waits, then finds the data prepared.
Remote data dirs (`gs://...`) are not locked: prepare them once from a single process.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath

NAME = "ssl_jax_digits"
NUM_CLASSES = 10
NUM_TEST = 360
SPLIT_SEED = 0
IMAGE_SHAPE = (8, 8, 1)


def load_digits_uint8() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as uint8 images `[1797, 8, 8, 1]` in 0..255 and int64 labels
    `[1797]`."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return images, digits.target.astype(np.int64)


def stratified_test_indices(
    labels: np.ndarray, num_test: int = NUM_TEST, seed: int = SPLIT_SEED
) -> np.ndarray:
    """Indices of the fixed stratified test split described in the module docstring.

    Args:
      labels: int class ids `[num_examples]`.
      num_test: total number of test examples.
      seed: mixed into the hash that orders the examples inside each class.

    Returns:
      int64 `[num_test]`, sorted ascending.
    """
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    quotas = counts * num_test / labels.size
    per_class = np.floor(quotas).astype(np.int64)
    # Largest remainders first; ties go to the smaller class id (stable sort).
    order = np.argsort(-(quotas - per_class), kind="stable")
    per_class[order[: num_test - per_class.sum()]] += 1

    def rank(index: int) -> str:
        return hashlib.sha256(f"{NAME}:{seed}:{index}".encode()).hexdigest()

    test = []
    for c, k in zip(classes, per_class, strict=True):
        members = sorted(np.flatnonzero(labels == c).tolist(), key=rank)
        test.extend(members[:k])
    return np.sort(np.asarray(test, dtype=np.int64))


class SslJaxDigits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn's 8x8 handwritten digits, 1,437 train / 360 test (see module docstring)."""

    VERSION = tfds.core.Version("1.0.0")
    # TFDS derives `code_path` for a builder in a package through `importlib_resources`, a
    # backport that tfds does not install; the builder needs no files beside its module.
    code_path = epath.Path(__file__)
    RELEASE_NOTES = {"1.0.0": "load_digits as uint8 [8, 8, 1]; fixed stratified 80/20 split."}

    def _info(self) -> tfds.core.DatasetInfo:
        class_names = [str(i) for i in range(NUM_CLASSES)]
        return tfds.core.DatasetInfo(
            builder=self,
            description="scikit-learn's bundled 8x8 handwritten digits (UCI optdigits subset).",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=IMAGE_SHAPE, dtype=np.uint8),
                    "label": tfds.features.ClassLabel(names=class_names),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # The data ships with scikit-learn.
        images, labels = load_digits_uint8()
        is_test = np.zeros(labels.size, dtype=bool)
        is_test[stratified_test_indices(labels)] = True
        return {
            "train": self._generate_examples(images, labels, np.flatnonzero(~is_test)),
            "test": self._generate_examples(images, labels, np.flatnonzero(is_test)),
        }

    def _generate_examples(
        self, images: np.ndarray, labels: np.ndarray, indices: np.ndarray
    ) -> Iterator[tuple[int, dict]]:
        for i in indices.tolist():
            yield i, {"image": images[i], "label": int(labels[i])}


@contextlib.contextmanager
def _exclusive_lock(path: str) -> Iterator[None]:
    """Holds an exclusive advisory lock on `path` (created if missing) on a local file system."""
    try:
        import fcntl
    except ImportError:  # Not POSIX: rely on TFDS' rename of the finished dir.
        fcntl = None
    if fcntl is None or "://" in path:
        yield
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def is_prepared(data_dir: str) -> bool:
    """Whether `data_dir` holds the finished files of this version (TFDS writes
    `dataset_info.json` last, inside the dir it renames into place)."""
    version_dir = epath.Path(data_dir) / NAME / str(SslJaxDigits.VERSION)
    return (version_dir / "dataset_info.json").exists()


def prepare(data_dir: str) -> SslJaxDigits:
    """Returns the builder over `data_dir`, writing its ArrayRecord files first if missing.

    Safe to call from several processes at once (see the module docstring). Takes about a
    second the first time; afterwards it only reads `dataset_info.json`.
    """
    if not is_prepared(data_dir):
        with _exclusive_lock(os.path.join(data_dir, f"{NAME}.lock")):
            if not is_prepared(data_dir):
                logging.info("Preparing the built-in digits dataset in %s", data_dir)
                shown = tfds.core.utils.tqdm_utils._active  # restored below: the user's choice
                tfds.display_progress_bar(False)
                try:
                    builder = SslJaxDigits(data_dir=data_dir, file_format="array_record")
                    builder.download_and_prepare()
                finally:
                    tfds.display_progress_bar(shown)
    # A fresh builder reads the split sizes that this or another process has written.
    return SslJaxDigits(data_dir=data_dir, file_format="array_record")
