"""The host input pipeline (Grain): shuffle, shard per process, decode, resize, batch.

The host only decodes and resizes; augmentation runs on the accelerator
(`ssl_jax.data.augment`). Every image leaves as uint8 RGB `[image_size, image_size, 3]`:
the shorter side is resized to `image_size` with Pillow's bicubic filter (antialiased when
shrinking), then the centre square is cropped; one `Image.resize(..., box=square)` call does
both, and pixels just outside the square still feed the filter at its edges. Grayscale and
palette images become 3 equal channels, alpha is dropped, CMYK is converted, 16-bit grayscale
keeps its top 8 bits, the 8x8 digits are upscaled: any size and mode is read, none is an error.
JPEGs larger than needed are decoded at a reduced DCT scale (`Image.draft`) that keeps both
sides >= `image_size`. A label outside `[0, num_classes)` stops reading with a `DataError` naming
the record; label -1 (an unlabelled split) is read by the training loader only (pre-training
uses no labels), never for evaluation.

Training order (`train_loader`): one global stream over all processes. Global position `i`
holds record `perm_e[i mod N]`, `perm_e` the seeded permutation of epoch `e = i div N`
(reshuffled every epoch, epochs without end). Global step `t` holds positions
`[t * B, (t + 1) * B)`, and process `p` of `P` reads the contiguous slice
`[t * B + p * B / P, t * B + (p + 1) * B / P)` of it, so that the processes' batches,
concatenated in process order (as `ssl_jax.parallel.global_batch` does), are the 1-process
batch: the same examples in the same order, whatever the number of processes (with
`num_workers=0`). Within an epoch the processes' shares are disjoint and cover the data.
(Each of `num_workers` Grain workers builds whole batches from every `num_workers`-th record
of its process's stream, so the batches depend on `num_workers`; they stay deterministic.
An undecodable image is replaced by the next record of the same process's stream.) The
iterator's `get_state()` / `set_state()` (and `grain.checkpoint.CheckpointSave` /
`CheckpointRestore` for Orbax) resume at the exact batch; a restore checks that the sampler
(with the process layout), the source and `num_workers` match.

Evaluation order (`eval_batches`): one pass in the source's order; process `p` reads the
contiguous share `[p * ceil(N / P), (p + 1) * ceil(N / P))`; every process yields the same
number of batches, the last ones padded, with `mask` marking real examples.

Undecodable images (corrupt or truncated files in an image folder): the record is skipped
in training (a Grain filter before batching; the batch fills up with the next records) and
masked out in evaluation (`mask` False). Each is logged once with its path, and a counter of
undecodable / read images is kept per reading process; once more than `CORRUPT_GRACE` files
and more than `MAX_CORRUPT_FRACTION` of the images read are undecodable, reading stops with
a `DataError`: the data is broken rather than a few files.
"""

from __future__ import annotations

import io
import sys
import threading
from collections.abc import Iterator
from typing import Any

import chex
import grain
import ml_collections
import numpy as np
from absl import logging
from PIL import Image

from ssl_jax.data.sources import DataError, make_source

MAX_CORRUPT_FRACTION = 0.01
CORRUPT_GRACE = 10
_UNDECODABLE = np.iinfo(np.int32).min  # label of a record whose image could not be decoded
UNLABELLED = -1  # the label of an unlabelled split's records (TFDS convention)


class UndecodableImageError(Exception):
    """Pillow could not decode an encoded image."""


def _square_resize(image: Image.Image, size: int) -> np.ndarray:
    """Shorter side resized to `size`, then centre crop: uint8 `[size, size, 3]`."""
    width, height = image.size
    if (width, height) != (size, size):
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        image = image.resize((size, size), Image.Resampling.BICUBIC,
                             box=(left, top, left + side, top + side))
    return np.asarray(image, dtype=np.uint8)


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode as RGB; 16- and 32-bit integer grayscale (16-bit PNGs) keep their top 8
    bits, where Pillow's own conversion would clip everything above 255 to white."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        values = np.asarray(image).astype(np.int64)
        image = Image.fromarray((np.clip(values, 0, 65535) >> 8).astype(np.uint8))
    return image.convert("RGB")


def decode_image(image: np.ndarray | bytes, size: int) -> np.ndarray:
    """Decodes and resizes one image (see the module docstring).

    Args:
      image: encoded bytes (JPEG, PNG, anything Pillow reads) or uint8 `[h, w]` / `[h, w, c]`
        with c in {1, 3, 4}.
      size: side of the output.

    Returns:
      uint8 `[size, size, 3]`.

    Raises:
      UndecodableImageError: the bytes are not an image Pillow can decode.
      DataError: an array that is not uint8 `[h, w]` or `[h, w, 1|3|4]`.
    """
    if isinstance(image, (bytes, bytearray, memoryview, np.bytes_)):
        try:
            with Image.open(io.BytesIO(image)) as encoded:
                encoded.draft("RGB", (size, size))
                rgb = _to_rgb(encoded)
        except Image.UnidentifiedImageError as e:
            raise UndecodableImageError("not in an image format that Pillow knows") from e
        except Exception as e:  # Pillow raises many types for broken files.
            raise UndecodableImageError(f"{type(e).__name__}: {e}") from e
        return _square_resize(rgb, size)
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.dtype != np.uint8 or array.ndim not in (2, 3) or (
            array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise DataError(f"an image array must be uint8 [h, w] or [h, w, 1|3|4], got "
                        f"{array.dtype} {list(array.shape)}.")
    return _square_resize(Image.fromarray(array).convert("RGB"), size)


class DecodedSource:
    """Wraps a source of `ssl_jax.data.sources`: records become
    `{'image': uint8 [size, size, 3], 'label': int32}`, label -1 for an undecodable image.

    Decoding here rather than in a Grain map lets Grain's read threads (`ReadOptions`) decode
    in parallel even with `num_workers=0`. Counts undecodable images (module docstring).
    """

    def __init__(self, source: Any, image_size: int, unlabelled_ok: bool = False):
        self._source = source
        self._size = image_size
        self._unlabelled_ok = unlabelled_ok  # label -1 passes (pre-training reads no labels)
        self.num_classes = source.num_classes
        self._lock = threading.Lock()
        self._read = 0
        self._undecodable = 0
        self._reported: set[str] = set()

    def __len__(self) -> int:
        return len(self._source)

    def __repr__(self) -> str:
        return f"DecodedSource({self._source!r}, image_size={self._size})"

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self._source[index]
        try:
            image = decode_image(record["image"], self._size)
        except UndecodableImageError as e:
            self._count_undecodable(record["id"], e)
            return {"image": np.zeros((self._size, self._size, 3), np.uint8),
                    "label": np.int32(_UNDECODABLE)}
        with self._lock:
            self._read += 1
        label = record["label"]
        if not (0 <= label < self.num_classes or self._unlabelled_ok and label == UNLABELLED):
            raise DataError(
                f"record {record['id']} has label {label}, outside [0, {self.num_classes}) of the "
                f"source's {self.num_classes} classes: fix the dataset's labels (an unlabelled "
                "split, label -1, can be pre-trained on but not evaluated: choose a labelled "
                "split for the evaluation job).")
        return {"image": image, "label": np.int32(label)}

    def _count_undecodable(self, record_id: str, error: Exception) -> None:
        with self._lock:
            self._read += 1
            self._undecodable += 1
            read, bad = self._read, self._undecodable
            first_time = record_id not in self._reported
            self._reported.add(record_id)
        if first_time:
            logging.warning("skipping undecodable image %s (%s); %d of %d images read here so "
                            "far were undecodable", record_id, error, bad, read)
        if bad > CORRUPT_GRACE and bad > MAX_CORRUPT_FRACTION * read:
            raise DataError(
                f"{bad} of the {read} images read so far could not be decoded (latest: "
                f"{record_id}: {error}); more than {MAX_CORRUPT_FRACTION:.0%} means broken data, "
                "not a few bad files: re-extract or re-encode the dataset, or delete the files "
                "that `PIL.Image.open(path).load()` rejects.")


class _KeepDecodable(grain.transforms.Filter):
    def filter(self, element: dict[str, Any]) -> bool:
        return bool(element["label"] != _UNDECODABLE)


class GlobalShuffleSampler:
    """Grain sampler of an endless, globally shuffled stream (see the module docstring).

    Global position `g` holds record `perm_{g div N}[g mod N]`, with `perm_e` a permutation of
    `range(N)` drawn from (seed, e) by Grain's index shuffle. The sampler of process `p` of `P`
    (with `local_batch = B / P` rows per global batch of `B`) maps its own position
    `i = k * local_batch + j` to the global position `k * B + p * local_batch + j`: row `j` of
    its `k`-th batch is row `p * local_batch + j` of global batch `k`.
    """

    def __init__(self, num_records: int, seed: int, local_batch: int = 1,
                 process_index: int = 0, process_count: int = 1):
        self._num_records = num_records
        self._seed = seed
        self._local_batch = local_batch
        self._process_index = process_index
        self._process_count = process_count
        self._keys = grain.MapDataset.range(num_records).shuffle(seed=seed)

    def __len__(self) -> int:
        return sys.maxsize

    def __repr__(self) -> str:
        shard = "" if self._process_count == 1 else (
            f", local_batch={self._local_batch}, process_index={self._process_index}, "
            f"process_count={self._process_count}")  # 1 process: as before, old states restore
        return f"GlobalShuffleSampler(num_records={self._num_records}, seed={self._seed}{shard})"

    def global_position(self, index: int) -> int:
        batch, row = divmod(index, self._local_batch)
        return (batch * self._process_count + self._process_index) * self._local_batch + row

    def __getitem__(self, index: int) -> grain.RecordMetadata:
        if index < 0:
            raise IndexError(f"negative sampler index {index}")
        return grain.RecordMetadata(
            index=index, record_key=int(self._keys[self.global_position(index)]))


def _check_processes(process_index: int, process_count: int) -> None:
    if process_count < 1 or not 0 <= process_index < process_count:
        raise DataError(f"process_index={process_index} must lie in [0, process_count="
                        f"{process_count}) and process_count must be >= 1.")


def _local_batch_size(batch_size: int, process_count: int, what: str) -> int:
    if batch_size < 1 or batch_size % process_count:
        raise DataError(f"{what}={batch_size} must be a positive multiple of the number of "
                        f"processes ({process_count}): each process loads {what} / "
                        f"{process_count} examples; change the batch size.")
    return batch_size // process_count


def read_options(data_cfg: ml_collections.ConfigDict, local_batch: int) -> grain.ReadOptions:
    """Grain's reading of this process (or worker): ``data.read_threads`` threads, two batches
    read ahead."""
    return grain.ReadOptions(num_threads=data_cfg.get("read_threads", 16),  # 16: older runs
                             prefetch_buffer_size=max(2 * local_batch, 64))


def train_loader(data_cfg: ml_collections.ConfigDict, *, global_batch_size: int, seed: int,
                 process_index: int = 0, process_count: int = 1) -> grain.DataLoader:
    """Endless shuffled training batches of this process (see the module docstring).

    `iter(loader)` yields `{'image': uint8 [global_batch_size / process_count, S, S, 3],
    'label': int32 [global_batch_size / process_count]}` with `S = data_cfg.image_size`; the
    iterator has `get_state()` / `set_state()`. Same config and seed, same batches.

    Raises:
      DataError: bad data config, a batch size that the processes cannot share evenly or that
        exceeds the training split.
    """
    _check_processes(process_index, process_count)
    local_batch = _local_batch_size(global_batch_size, process_count, "global_batch_size")
    if not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise DataError(f"the data seed must be an integer in [0, 2**32), got {seed!r}.")
    source = make_source(data_cfg, data_cfg.train_split)
    if global_batch_size > len(source):
        raise DataError(f"global_batch_size={global_batch_size} exceeds the {len(source)} "
                        f"examples of split {data_cfg.train_split!r}: use a smaller batch size.")
    return grain.DataLoader(
        data_source=DecodedSource(source, data_cfg.image_size, unlabelled_ok=True),
        sampler=GlobalShuffleSampler(len(source), int(seed), local_batch, process_index,
                                     process_count),
        operations=[_KeepDecodable(),
                    grain.transforms.Batch(batch_size=local_batch, drop_remainder=True)],
        worker_count=data_cfg.num_workers,
        worker_buffer_size=data_cfg.get("prefetch", 2),
        shard_options=grain.sharding.NoSharding(),  # the sampler holds this process's share
        read_options=read_options(data_cfg, local_batch),
    )


def _padded(batch: dict[str, np.ndarray] | None, size: int, image_size: int
            ) -> dict[str, np.ndarray]:
    """Pads a batch of n <= size decoded records to `size` rows; `mask` marks real images."""
    image = np.zeros((size, image_size, image_size, 3), np.uint8)
    label = np.full((size,), _UNDECODABLE, np.int32)
    if batch is not None:
        n = batch["label"].shape[0]
        image[:n], label[:n] = batch["image"], batch["label"]
    mask = label != _UNDECODABLE
    out = {"image": image, "label": np.where(mask, label, 0).astype(np.int32), "mask": mask}
    chex.assert_shape(out["image"], (size, image_size, image_size, 3))
    chex.assert_shape([out["label"], out["mask"]], (size,))
    return out


def eval_batches(data_cfg: ml_collections.ConfigDict, split: str, *, batch_size: int,
                 process_index: int = 0, process_count: int = 1
                 ) -> Iterator[dict[str, np.ndarray]]:
    """One deterministic pass over `split`, this process's contiguous share, in batches.

    `batch_size` is global, like `train_loader`'s: each process yields batches of
    `b = batch_size / process_count` rows, all processes the same number
    `ceil(ceil(N / process_count) / b)` of batches.

    Yields:
      `{'image': uint8 [b, S, S, 3], 'label': int32 [b], 'mask': bool [b]}`; `mask` is False
      for padding and undecodable images (their label is 0).

    Raises (at the call, not at the first batch):
      DataError: bad data config or a batch size that the processes cannot share evenly.
    """
    _check_processes(process_index, process_count)
    local_batch = _local_batch_size(batch_size, process_count, "batch_size")
    source = make_source(data_cfg, split)
    size = data_cfg.image_size
    share = -(-len(source) // process_count)
    start = min(process_index * share, len(source))
    stop = min(start + share, len(source))
    num_batches = -(-share // local_batch)
    batches: Any = iter(())
    if stop > start:
        ds = grain.MapDataset.source(DecodedSource(source, size))[start:stop]
        it = ds.to_iter_dataset(read_options(data_cfg, local_batch))
        if data_cfg.num_workers > 0:
            it = it.mp_prefetch(grain.MultiprocessingOptions(
                num_workers=data_cfg.num_workers,
                per_worker_buffer_size=data_cfg.get("prefetch", 2)))
        batches = iter(it.batch(local_batch, drop_remainder=False))

    def generate() -> Iterator[dict[str, np.ndarray]]:
        for _ in range(num_batches):
            yield _padded(next(batches, None), local_batch, size)

    return generate()


def num_examples(data_cfg: ml_collections.ConfigDict, split: str) -> int:
    """The number of examples in `split` (undecodable images included)."""
    return len(make_source(data_cfg, split))


def num_classes(data_cfg: ml_collections.ConfigDict) -> int:
    """The number of classes of the dataset (from its training split)."""
    return make_source(data_cfg, data_cfg.train_split).num_classes
