"""The host input pipeline (Grain): shuffle, shard per process, decode, resize, batch.

The host only decodes and resizes; augmentation runs on the accelerator
(`ssl_jax.data.augment`). Every image leaves as uint8 RGB `[image_size, image_size, 3]`:
the shorter side is resized to `image_size` with Pillow's bicubic filter (antialiased when
shrinking), then the centre square is cropped; one `Image.resize(..., box=square)` call does
both, and pixels just outside the square still feed the filter at its edges. With
`data.train_region='whole'` the training images instead keep their aspect (shorter side at
`image_size`, the longer up to `max_aspect` times it) on an edge-padded square canvas, with the
content's size in the `image_hw` field (`sources.train_fields`); evaluation always gets the
centre square. Grayscale and
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
An undecodable image is replaced by the next record of the same process's stream.) Both
training and evaluation use Grain's Dataset API (`grain.MapDataset` -> `IterDataset`). The
training iterator's `get_state()` / `set_state()` (and `grain.checkpoint.CheckpointSave` /
`CheckpointRestore` for Orbax) resume at the exact batch; a restore checks that the stream
(with the process layout), the source and `num_workers` match, and converts a state saved by
the `grain.DataLoader` of earlier versions (see `TrainIterator`).

Fields: every batch holds exactly the fields the source declares (`sources.source_fields`;
`image` decoded here, the others cast to their declared dtype); evaluation adds `mask`.

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
from absl import flags, logging
from PIL import Image

from ssl_jax.data import sources
from ssl_jax.data.sources import DataError, Field, make_source

MAX_CORRUPT_FRACTION = 0.01
CORRUPT_GRACE = 10
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


def _whole_resize(image: Image.Image, size: int, canvas: int) -> tuple[np.ndarray, np.ndarray]:
    """Shorter side resized to `size`, the longer to at most `canvas` (its centre part beyond
    that), at the top left of a `[canvas, canvas, 3]` image whose other pixels repeat the
    edge; returns it and the content's `(height, width)`."""
    width, height = image.size
    scale = size / min(width, height)
    out_w, out_h = min(round(width * scale), canvas), min(round(height * scale), canvas)
    src_w, src_h = out_w / scale, out_h / scale  # the part of the original kept
    left, top = (width - src_w) / 2, (height - src_h) / 2
    resized = np.asarray(image.resize((out_w, out_h), Image.Resampling.BICUBIC,
                                      box=(left, top, left + src_w, top + src_h)), np.uint8)
    padded = np.pad(resized, ((0, canvas - out_h), (0, canvas - out_w), (0, 0)), mode="edge")
    return padded, np.asarray([out_h, out_w], np.int32)


def decode_image(image: np.ndarray | bytes, size: int, canvas: int = 0
                 ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Decodes and resizes one image (see the module docstring).

    Args:
      image: encoded bytes (JPEG, PNG, anything Pillow reads) or uint8 `[h, w]` / `[h, w, c]`
        with c in {1, 3, 4}.
      size: side of the output, or with `canvas` the shorter side of the whole image.
      canvas: 0 for the centre square; else the whole image on a `[canvas, canvas, 3]` canvas
        (`data.train_region='whole'`, `sources.canvas_size`).

    Returns:
      uint8 `[size, size, 3]`; with `canvas`: uint8 `[canvas, canvas, 3]` and the content's
      int32 `(height, width)` at its top left.

    Raises:
      UndecodableImageError: the bytes are not an image Pillow can decode.
      DataError: an array that is not uint8 `[h, w]` or `[h, w, 1|3|4]`.
    """
    rgb = _decode_rgb(image, size)
    return _whole_resize(rgb, size, canvas) if canvas else _square_resize(rgb, size)


def _decode_rgb(image: np.ndarray | bytes, size: int) -> Image.Image:
    """Encoded bytes or a uint8 array as an RGB Pillow image (JPEGs drafted near `size`)."""
    if isinstance(image, (bytes, bytearray, memoryview, np.bytes_)):
        try:
            with Image.open(io.BytesIO(image)) as encoded:
                encoded.draft("RGB", (size, size))
                rgb = _to_rgb(encoded)
        except Image.UnidentifiedImageError as e:
            raise UndecodableImageError("not in an image format that Pillow knows") from e
        except Exception as e:  # Pillow raises many types for broken files.
            raise UndecodableImageError(f"{type(e).__name__}: {e}") from e
        return rgb
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.dtype != np.uint8 or array.ndim not in (2, 3) or (
            array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise DataError(f"an image array must be uint8 [h, w] or [h, w, 1|3|4], got "
                        f"{array.dtype} {list(array.shape)}.")
    return Image.fromarray(array).convert("RGB")


class DecodedSource:
    """Wraps a source of `ssl_jax.data.sources`: records become exactly the declared `fields`
    (`sources.source_fields(data_cfg)`; an int: image and label of that image size): `'image'`
    decoded to uint8 `[size, size, 3]`, the others cast to their declared dtype and checked
    against their shape. An undecodable image gives None (a
    Grain dataset skips it) or, with `with_mask`, zeros and `mask` False (evaluation).

    Decoding here rather than in a Grain map lets Grain's read threads (`ReadOptions`) decode
    in parallel even with `num_workers=0`. Counts undecodable images (module docstring).
    """

    def __init__(self, source: Any, fields: dict[str, Field] | int, unlabelled_ok: bool = False,
                 with_mask: bool = False, image_size: int = 0):
        self._source = source
        self._fields = dict(sources.image_label_fields(fields) if isinstance(fields, int)
                            else fields)
        # 'image_hw' declared: the whole image on a canvas (sources.train_fields)
        self._canvas = self._fields["image"].shape[0] if "image_hw" in self._fields else 0
        self._size = image_size or self._fields["image"].shape[0]
        self._unlabelled_ok = unlabelled_ok  # label -1 passes (pre-training reads no labels)
        self._with_mask = with_mask
        self.num_classes = source.num_classes
        self._lock = threading.Lock()
        self._read = 0
        self._undecodable = 0
        self._reported: set[str] = set()

    def __len__(self) -> int:
        return len(self._source)

    def __repr__(self) -> str:  # that of the DataLoader era, so that its states still restore
        whole = f", canvas={self._canvas}" if self._canvas else ""
        return f"DecodedSource({self._source!r}, image_size={self._size}{whole})"

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        record = self._source[index]
        try:
            decoded = decode_image(record["image"], self._size, self._canvas)
        except UndecodableImageError as e:
            self._count_undecodable(record["id"], e)
            if not self._with_mask:
                return None
            return {**empty_batch(self._fields, None), "mask": np.False_}
        with self._lock:
            self._read += 1
        out = ({"image": decoded[0], "image_hw": decoded[1]} if self._canvas
               else {"image": decoded})
        for name, field in self._fields.items():
            if name not in out:
                out[name] = np.asarray(record[name], dtype=field.dtype)
                if out[name].shape != tuple(field.shape):
                    raise DataError(f"record {record['id']}: field {name!r} has shape "
                                    f"{list(out[name].shape)}, but its source declares "
                                    f"{list(field.shape)}: fix the source or its fields().")
        label = out.get("label")
        if label is not None and not (0 <= label < self.num_classes or
                                      self._unlabelled_ok and label == UNLABELLED):
            raise DataError(
                f"record {record['id']} has label {label}, outside [0, {self.num_classes}) of the "
                f"source's {self.num_classes} classes: fix the dataset's labels (an unlabelled "
                "split, label -1, can be pre-trained on but not evaluated: choose a labelled "
                "split for the evaluation job).")
        return {**out, "mask": np.True_} if self._with_mask else out

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


def empty_batch(fields: dict[str, Field], size: int | None) -> dict[str, np.ndarray]:
    """Zeros of every field, `[size, *shape]` (one example's `shape` for `size=None`)."""
    lead = () if size is None else (size,)
    return {name: np.zeros(lead + tuple(f.shape), f.dtype) for name, f in fields.items()}


class _StreamKeys(grain.transforms.Map):
    """Position `i` of this process's training stream -> the record key (module docstring).

    Global position `g` holds record `perm_{g div N}[g mod N]`, with `perm_e` a permutation of
    `range(N)` drawn from (seed, e) by Grain's index shuffle. Process `p` of `P` (with
    `local_batch = B / P` rows per global batch of `B`) maps its own position
    `i = k * local_batch + j` to the global position `k * B + p * local_batch + j`: row `j` of
    its `k`-th batch is row `p * local_batch + j` of global batch `k`.
    """

    def __init__(self, num_records: int, seed: int, local_batch: int, process_index: int,
                 process_count: int):
        self._local_batch = local_batch
        self._process_index = process_index
        self._process_count = process_count
        self._keys = grain.MapDataset.range(num_records).shuffle(seed=seed)
        shard = "" if process_count == 1 else (
            f", local_batch={local_batch}, process_index={process_index}, "
            f"process_count={process_count}")  # 1 process: the DataLoader era's sampler repr
        self.layout = f"GlobalShuffleSampler(num_records={num_records}, seed={seed}{shard})"

    def global_position(self, index: int) -> int:
        batch, row = divmod(index, self._local_batch)
        return (batch * self._process_count + self._process_index) * self._local_batch + row

    def map(self, index: int) -> int:
        return int(self._keys[self.global_position(int(index))])


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


def prefetch_in_workers(ds: grain.IterDataset, num_workers: int, prefetch: int
                        ) -> grain.IterDataset:
    """``ds`` read by ``num_workers`` Grain worker processes (0: ``ds`` itself). Grain reads its
    absl flags when it starts them: flags a caller has not parsed (a plain script, a notebook)
    are marked parsed with their defaults first, so no caller needs ``absl.app.run``."""
    if num_workers <= 0:
        return ds
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    return ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers,
                                                       per_worker_buffer_size=prefetch))


def read_options(data_cfg: ml_collections.ConfigDict, local_batch: int) -> grain.ReadOptions:
    """Grain's reading of this process (or worker): ``data.read_threads`` threads, two batches
    read ahead."""
    return grain.ReadOptions(num_threads=data_cfg.read_threads,
                             prefetch_buffer_size=max(2 * local_batch, 64))


class TrainIterator(grain.DatasetIterator):
    """The training stream's iterator: batches of a Grain `IterDataset` started at stream
    position `start`, with `get_state()` / `set_state()` (and so `grain.checkpoint`'s Orbax
    handler).

    State: `{'layout': the stream, source and worker count it belongs to, 'start': int,
    'grain': the Grain iterator's own state}`; `set_state` refuses a state of another layout.

    States written by the DataLoader iterator of earlier versions (keys `last_seen_indices`,
    `sampler`, `data_source`, `worker_count`) are converted: their sampler index `i` is stream
    position `i` here, so the stream restarts at `start = max(last_seen_indices) + 1`. With
    `worker_count=0` (the default) that is exactly where the old iterator stood: the run resumes
    bit for bit. With worker processes the old workers had read interleaved positions; the
    stream then restarts, deterministically, after the furthest one read (a few records of the
    last batches may be skipped) and a warning says so.
    """

    def __init__(self, dataset: Any, layout: str, num_workers: int):
        self._dataset = dataset  # start -> IterDataset of batches
        self._layout = layout
        self._num_workers = num_workers
        self._start = 0
        super().__init__(iter(dataset(0)))

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._parent)

    def get_state(self) -> dict[str, Any]:
        return {"layout": self._layout, "start": self._start, "grain": self._parent.get_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        if "last_seen_indices" in state:
            state = self._convert_data_loader_state(state)
        if state.get("layout") != self._layout:
            raise DataError(f"the saved data position belongs to {state.get('layout')!r}, not to "
                            f"this pipeline, {self._layout!r}: the data config changed.")
        self._start = int(state["start"])
        self._parent.close()  # its worker processes, if any
        self._parents = (iter(self._dataset(self._start)),)
        if state.get("grain") is not None:
            self._parent.set_state(state["grain"])

    def start_prefetch(self) -> None:
        self._parent.start_prefetch()

    def _convert_data_loader_state(self, old: dict[str, Any]) -> dict[str, Any]:
        workers = int(old["worker_count"])
        layout = f"{old['sampler']}, {old['data_source']}, num_workers={workers}"
        start = max(int(i) for i in old["last_seen_indices"].values()) + 1
        if workers != self._num_workers:
            raise DataError(f"the saved data position was written with data.num_workers="
                            f"{workers}; resume with --config.data.num_workers={workers}.")
        if workers > 0:
            logging.warning(
                "converting a data position saved by the DataLoader iterator with %d workers: "
                "the stream restarts at position %d, after the furthest record read, so a few "
                "records of the last batches may be skipped (not bit for bit)", workers, start)
        return {"layout": layout, "start": start, "grain": None}


def train_loader(data_cfg: ml_collections.ConfigDict, *, global_batch_size: int, seed: int,
                 process_index: int = 0, process_count: int = 1, source: Any = None
                 ) -> grain.IterDataset:
    """Endless shuffled training batches of this process (see the module docstring).

    `iter(loader)` is a :class:`TrainIterator` yielding exactly the source's declared fields
    (`sources.source_fields`), e.g. `{'image': uint8 [b, S, S, 3], 'label': int32 [b]}` with
    `b = global_batch_size / process_count`, `S = data_cfg.image_size`. Same config and seed,
    same batches. `source` replaces the training split (e.g. a labelled subset; its labels
    must then lie in `[0, num_classes)`).

    Raises:
      DataError: bad data config, a batch size that the processes cannot share evenly or that
        exceeds the training split.
    """
    _check_processes(process_index, process_count)
    local_batch = _local_batch_size(global_batch_size, process_count, "global_batch_size")
    if not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise DataError(f"the data seed must be an integer in [0, 2**32), got {seed!r}.")
    fields = sources.train_fields(data_cfg)
    unlabelled_ok = source is None
    source = source if source is not None else make_source(data_cfg, data_cfg.train_split)
    if global_batch_size > len(source):
        raise DataError(f"global_batch_size={global_batch_size} exceeds the {len(source)} "
                        f"examples of split {data_cfg.train_split!r}: use a smaller batch size.")
    decoded = DecodedSource(source, fields, unlabelled_ok=unlabelled_ok,
                            image_size=data_cfg.image_size)
    return _TrainDataset(decoded,
                         _StreamKeys(len(source), int(seed), local_batch, process_index,
                                     process_count),
                         local_batch, data_cfg)


class _TrainDataset(grain.IterDataset):
    """`train_loader`'s dataset: stream positions -> record keys -> decoded records (an
    undecodable one skipped) -> batches, `data.num_workers` worker processes."""

    def __init__(self, decoded: DecodedSource, keys: _StreamKeys, local_batch: int,
                 data_cfg: ml_collections.ConfigDict):
        super().__init__()
        self._decoded, self._keys, self._local_batch = decoded, keys, local_batch
        self._workers = data_cfg.num_workers
        self._prefetch = data_cfg.prefetch
        self._read_options = read_options(data_cfg, local_batch)
        self.layout = f"{keys.layout}, {decoded!r}, num_workers={self._workers}"

    def from_position(self, start: int) -> grain.IterDataset:
        records = (grain.MapDataset.range(start, sys.maxsize).map(self._keys)
                   .map(self._decoded.__getitem__))
        ds = records.to_iter_dataset(self._read_options).batch(self._local_batch,
                                                              drop_remainder=True)
        return prefetch_in_workers(ds, self._workers, self._prefetch)

    def __iter__(self) -> TrainIterator:
        return TrainIterator(self.from_position, self.layout, self._workers)


def eval_batches(data_cfg: ml_collections.ConfigDict, split: str, *, batch_size: int,
                 process_index: int = 0, process_count: int = 1
                 ) -> Iterator[dict[str, np.ndarray]]:
    """One deterministic pass over `split`, this process's contiguous share, in batches.

    `batch_size` is global, like `train_loader`'s: each process yields batches of
    `b = batch_size / process_count` rows, all processes the same number
    `ceil(ceil(N / process_count) / b)` of batches.

    Yields:
      the source's declared fields plus `mask`, e.g. `{'image': uint8 [b, S, S, 3],
      'label': int32 [b], 'mask': bool [b]}`; `mask` is False for padding and undecodable
      images (their fields are zeros).

    Raises (at the call, not at the first batch):
      DataError: bad data config or a batch size that the processes cannot share evenly.
    """
    _check_processes(process_index, process_count)
    local_batch = _local_batch_size(batch_size, process_count, "batch_size")
    fields = sources.source_fields(data_cfg)
    source = make_source(data_cfg, split)
    share = -(-len(source) // process_count)
    start = min(process_index * share, len(source))
    stop = min(start + share, len(source))
    num_batches = -(-share // local_batch)
    batches: Any = iter(())
    if stop > start:
        ds = grain.MapDataset.source(DecodedSource(source, fields, with_mask=True))[start:stop]
        it = ds.to_iter_dataset(read_options(data_cfg, local_batch))
        it = prefetch_in_workers(it, data_cfg.num_workers, data_cfg.prefetch)
        batches = iter(it.batch(local_batch, drop_remainder=False))

    def generate() -> Iterator[dict[str, np.ndarray]]:
        for _ in range(num_batches):
            yield _padded(next(batches, None), local_batch, fields)

    return generate()


def _padded(batch: dict[str, np.ndarray] | None, size: int, fields: dict[str, Field]
            ) -> dict[str, np.ndarray]:
    """Pads a batch of n <= size records to `size` rows; `mask` marks real images."""
    out = {**empty_batch(fields, size), "mask": np.zeros((size,), bool)}
    if batch is not None:
        n = batch["mask"].shape[0]
        for name in out:
            out[name][:n] = batch[name]
    for name, field in fields.items():
        chex.assert_shape(out[name], (size, *field.shape))
    return out


def num_examples(data_cfg: ml_collections.ConfigDict, split: str) -> int:
    """The number of examples in `split` (undecodable images included)."""
    return len(make_source(data_cfg, split))


def num_classes(data_cfg: ml_collections.ConfigDict) -> int:
    """The number of classes of the dataset (from its training split)."""
    return make_source(data_cfg, data_cfg.train_split).num_classes
