"""Where examples come from: the built-in digits, a TFDS catalogue dataset, an image folder.

`make_source(data_cfg, split)` returns a random-access source for Grain (`__len__`,
`__getitem__`, a stable `__repr__` that the pipeline checks when it restores a checkpointed
position, `num_classes`, and the classmethod `fields(data_cfg)`: the fields, name ->
`Field(shape, dtype)`, of the examples the pipeline emits, e.g. image uint8
`[image_size, image_size, 3]` and label int32 `[]`; `source_fields(data_cfg)` gives them
without reading data, for the model's init batch). Its records are dicts

    {'image': uint8 [height, width, channels] array OR encoded image bytes (JPEG/PNG),
     'label': int in [0, num_classes),
     'id':    str, the file path or 'NAME/SPLIT[INDEX]', for messages about a bad record}

and the pipeline decodes them (`ssl_jax.data.pipeline`). Nothing here needs TensorFlow:
TFDS data is read as ArrayRecord through `tfds.data_source`, with `Image` features left
encoded (`tfds.decode.SkipDecoding`) for Pillow.

Which source (`data_cfg.source`, `data_cfg.name`):

- 'builtin' (or 'auto' with name 'digits'): scikit-learn's digits, prepared into the TFDS data
  dir on first use (`ssl_jax.data.digits`).
- 'folder' (or 'auto' with name 'folder'): `ROOT/SPLIT/CLASS/*.{jpg,jpeg,png}` (suffix in any
  case). A class's index is its position among the sorted class folders of the training
  split (so every split uses the same mapping); files are sorted. A class folder of the
  training split without images is an error (a failed copy, not a class); another split may
  lack classes, but not have classes the training split does not.
- 'tfds': a TFDS dataset prepared as ArrayRecord in the data dir (`download=False`).
- 'auto' with any other name: TFDS if that dataset is prepared in the data dir, else the image
  folder at `data_cfg.root`.

The data dir is `data_cfg.data_dir`, else `$TFDS_DATA_DIR`, else
`~/.cache/ssl_jax/tensorflow_datasets`.
"""

from __future__ import annotations

import functools
import glob
import math
import os
from typing import Any, NamedTuple

import ml_collections
import numpy as np

DEFAULT_DATA_DIR = "~/.cache/ssl_jax/tensorflow_datasets"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
SOURCES = ("auto", "builtin", "tfds", "folder")
CIFAR10_ARCHIVE = "../shared/datasets/cifar10-jpeg.tar.gz"


class DataError(ValueError):
    """A problem with the user's data or data config; the message names the fix."""


class Field(NamedTuple):
    """One field of the examples a source declares: the shape and dtype of one example's value
    *after* the pipeline (images decoded and resized), e.g. ``Field((32, 32, 3), 'uint8')``."""

    shape: tuple[int, ...]
    dtype: str


def image_label_fields(image_size: int) -> dict[str, Field]:
    """``{'image': uint8 [image_size, image_size, 3], 'label': int32 []}``: the fields of every
    classification source (the digits, TFDS, an image folder)."""
    return {"image": Field((image_size, image_size, 3), "uint8"), "label": Field((), "int32")}


class _ImageLabelFields:
    """Sources of labelled images declare :func:`image_label_fields`."""

    @classmethod
    def fields(cls, data_cfg: ml_collections.ConfigDict) -> dict[str, Field]:
        """The fields of the pipeline's examples (name -> :class:`Field`), from the config
        alone: ``'image'`` is decoded to ``data.image_size``; every other field passes through
        as given by ``source[i][name]``, cast to its dtype."""
        return image_label_fields(data_cfg.image_size)


def resolve_data_dir(data_cfg: ml_collections.ConfigDict) -> str:
    """`data_cfg.data_dir`, else `$TFDS_DATA_DIR`, else `~/.cache/ssl_jax/tensorflow_datasets`."""
    data_dir = data_cfg.get("data_dir", "") or os.environ.get("TFDS_DATA_DIR", "")
    return os.path.expanduser(data_dir or DEFAULT_DATA_DIR)


class TfdsSource(_ImageLabelFields):
    """A TFDS ArrayRecord split as `{'image', 'label', 'id'}` records."""

    def __init__(self, data_source: Any, *, name: str, split: str, num_classes: int,
                 image_key: str = "image", label_key: str = "label"):
        self._source = data_source
        self.name = name
        self.split = split
        self.num_classes = num_classes
        self._image_key = image_key
        self._label_key = label_key
        self._len = len(data_source)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self._source[index]
        return {"image": record[self._image_key], "label": int(record[self._label_key]),
                "id": f"{self.name}/{self.split}[{index}]"}

    def __repr__(self) -> str:
        return (f"TfdsSource(name={self.name!r}, split={self.split!r}, "
                f"num_records={self._len}, num_classes={self.num_classes})")


class ImageFolderSource(_ImageLabelFields):
    """`ROOT/SPLIT/CLASS/*.{jpg,jpeg,png}` as `{'image': encoded bytes, 'label', 'id': path}`.

    Attributes:
      classes: class folder names; label `i` is `classes[i]`.
      files: paths relative to `ROOT/SPLIT`, sorted by (class, file name).
      labels: int32 `[num_records]`.
    """

    def __init__(self, root: str, split: str, *, class_split: str | None = None):
        self.root = os.path.expanduser(root)
        self.split = split
        self.classes, self.files, self.labels = _scan_image_folder(
            self.root, split, class_split or split)
        self.num_classes = len(self.classes)

    def __len__(self) -> int:
        return len(self.files)

    def path(self, index: int) -> str:
        return os.path.join(self.root, self.split, self.files[index])

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.path(index)
        with open(path, "rb") as f:
            data = f.read()
        return {"image": data, "label": int(self.labels[index]), "id": path}

    def __repr__(self) -> str:
        # No path: a run resumes after its data moved to another disk.
        return (f"ImageFolderSource(split={self.split!r}, num_records={len(self)}, "
                f"num_classes={self.num_classes})")


def _subdirs(path: str) -> list[str]:
    with os.scandir(path) as entries:
        return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))


@functools.lru_cache(maxsize=64)
def _list_class_dir(class_dir: str, mtime_ns: int) -> tuple[str, ...]:
    """Sorted image file names in one class folder; `mtime_ns` keys the cache."""
    del mtime_ns
    with os.scandir(class_dir) as entries:
        return tuple(sorted(
            e.name for e in entries
            if e.is_file() and not e.name.startswith(".")
            and e.name.lower().endswith(IMAGE_SUFFIXES)))


def _scan_image_folder(root: str, split: str, class_split: str
                       ) -> tuple[tuple[str, ...], list[str], np.ndarray]:
    """Lists `root/split`; returns (class names, relative file paths, int32 labels)."""
    if not root:
        raise DataError("data.root is empty: pass --config.data.root=DIR, where DIR/SPLIT/CLASS/ "
                        "holds the images (*.jpg, *.jpeg, *.png).")
    if not os.path.isdir(root):
        raise DataError(f"image folder root {root!r} does not exist or is not a directory: "
                        "fix --config.data.root (expected layout ROOT/SPLIT/CLASS/*.jpg).")
    split_dir = os.path.join(root, split)
    if not os.path.isdir(split_dir):
        present = _subdirs(root)
        raise DataError(
            f"split {split!r} not found: {split_dir!r} is not a directory (folders in {root!r}: "
            f"{present or 'none'}). Fix --config.data.root or the split name "
            "(--config.data.train_split / --config.data.test_split).")
    classes = _subdirs(split_dir)
    if not classes:
        raise DataError(f"no class folders in {split_dir!r}: expected {split_dir}/CLASS/*.jpg, "
                        "one folder per class.")
    class_dir = os.path.join(root, class_split)
    defines_classes = class_split == split or not os.path.isdir(class_dir)
    if not defines_classes:
        reference = _subdirs(class_dir)
        unknown = sorted(set(classes) - set(reference))
        if unknown:
            raise DataError(
                f"class folders {unknown} of {split_dir!r} are missing from {class_dir!r}; "
                "every split must use the class folders of the training split.")
        classes = reference
    files, labels, empty = [], [], []
    for label, name in enumerate(classes):
        path = os.path.join(split_dir, name)
        if not os.path.isdir(path):
            continue
        names = _list_class_dir(path, os.stat(path).st_mtime_ns)
        files.extend(os.path.join(name, f) for f in names)
        labels.extend([label] * len(names))
        if not names:
            empty.append(name)
    if not files:
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}, any case) in the class folders "
                        f"of {split_dir!r}: an empty split; put the images in "
                        f"{split_dir}/CLASS/ or fix --config.data.root or the split name.")
    if empty and defines_classes:  # a class without examples is a failed copy, not a class
        raise DataError(
            f"class folder(s) {empty[:5]}{' ...' if len(empty) > 5 else ''} of {split_dir!r} hold "
            f"no images ({', '.join(IMAGE_SUFFIXES)}, any case): the folders of this split define "
            "the classes, so copy their images in or remove the empty folders.")
    return tuple(classes), files, np.asarray(labels, dtype=np.int32)


def _tfds_build_hint(name: str, data_dir: str) -> str:
    return (f"prepare it once with `tfds build {name} --file_format=array_record "
            f"--data_dir {data_dir}` (TensorFlow is needed for that step only, e.g. in a separate "
            "environment; datasets with manual downloads such as imagenet2012 need their archives "
            f"in {data_dir}/downloads/manual first)")


def _folder_hint(name: str, source_flag: str = "") -> str:
    hint = (f"or read an image folder ROOT/SPLIT/CLASS/*.jpg with {source_flag}"
            "--config.data.root=ROOT")
    if name == "cifar10":
        hint += (f" (for CIFAR-10 unpack the JPEG copy with `tar xzf {CIFAR10_ARCHIVE} -C DIR`; "
                 "ROOT is then DIR/cifar10)")
    return hint


def _tfds_builder(name: str, data_dir: str) -> tuple[Any, str]:
    """(builder, '') if `name` is prepared as ArrayRecord in `data_dir`, else (None, reason)."""
    import tensorflow_datasets as tfds

    base_dir = os.path.join(data_dir, name.split("/")[0].split(":")[0])
    if "://" not in data_dir and not glob.glob(os.path.join(glob.escape(base_dir), "**",
                                                            "dataset_info.json"), recursive=True):
        return None, f"TFDS dataset {name!r} is not prepared in {data_dir}"
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        return None, f"TFDS knows no dataset {name!r} and none is prepared in {data_dir}"
    except Exception as e:  # A catalogue builder that cannot load here.
        return None, f"TFDS could not load {name!r}: {type(e).__name__}: {e}"
    if not builder.is_prepared():
        return None, f"TFDS dataset {name!r} is not prepared in {data_dir}"
    file_format = getattr(builder.info.file_format, "value", builder.info.file_format)
    if file_format != "array_record":
        return None, (f"TFDS dataset {name!r} is prepared in {data_dir} as {file_format}, which "
                      "allows no random access; rebuild it as ArrayRecord")
    return builder, ""


def _wrap_tfds(builder: Any, name: str, split: str) -> TfdsSource:
    """Reads `split` of a prepared builder, leaving `Image` features encoded for Pillow."""
    import tensorflow_datasets as tfds

    features = builder.info.features
    keys = builder.info.supervised_keys
    image_key, label_key = "image", "label"
    if isinstance(keys, tuple) and len(keys) == 2 and all(isinstance(k, str) for k in keys):
        image_key, label_key = keys
    if image_key not in features or label_key not in features:
        raise DataError(f"TFDS dataset {name!r} has features {list(features)}; need an image "
                        f"{image_key!r} and a label {label_key!r}.")
    label = features[label_key]
    if not isinstance(label, tfds.features.ClassLabel):
        raise DataError(f"TFDS dataset {name!r}: feature {label_key!r} is a "
                        f"{type(label).__name__}, not a ClassLabel.")
    decoders = None
    if isinstance(features[image_key], tfds.features.Image):
        decoders = {image_key: tfds.decode.SkipDecoding()}
    try:
        source = builder.as_data_source(split=split, decoders=decoders)
    except (KeyError, ValueError, AssertionError) as e:
        raise DataError(f"split {split!r} of {name!r} is not available ({e}); its splits are "
                        f"{list(builder.info.splits)}: fix --config.data.train_split / "
                        "--config.data.test_split.") from e
    return TfdsSource(source, name=name, split=split, num_classes=label.num_classes,
                      image_key=image_key, label_key=label_key)


def check_data_config(data_cfg: ml_collections.ConfigDict) -> None:
    """The pipeline's numbers: a positive image size, workers >= 0, prefetch and read threads
    >= 1; a known training region and a maximal aspect ratio >= 1."""
    for key, low in (("image_size", 1), ("num_workers", 0), ("prefetch", 1), ("read_threads", 1)):
        value = data_cfg.get(key, low)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise DataError(f"config.data.{key}={value!r} must be an integer >= {low}: fix "
                            f"--config.data.{key}.")
    region, aspect = train_region(data_cfg)
    if region not in TRAIN_REGIONS:
        raise DataError(f"config.data.train_region={region!r} is unknown: use one of "
                        f"{TRAIN_REGIONS} ('whole' lets the crops see the whole image).")
    if isinstance(aspect, bool) or not isinstance(aspect, (int, float)) or not 1 <= aspect <= 4:
        raise DataError(f"config.data.max_aspect={aspect!r} must be a number in [1, 4] (the "
                        "longest side kept, over the shorter): fix --config.data.max_aspect.")


# Training images: 'square' (the shorter side resized to image_size, then the centre square) or
# 'whole' (the shorter side resized to image_size, the longer kept up to max_aspect times it,
# top-left on a square canvas padded by its edge pixels, the content's size in 'image_hw'): the
# device's random crops then sample the whole image as torchvision's RandomResizedCrop does.
TRAIN_REGIONS = ("square", "whole")


def train_region(data_cfg: ml_collections.ConfigDict) -> tuple[str, float]:
    """``(data.train_region, data.max_aspect)``; a config from before the keys: the square."""
    return data_cfg.get("train_region", "square"), data_cfg.get("max_aspect", 4 / 3)


def canvas_size(data_cfg: ml_collections.ConfigDict) -> int:
    """Side of the training images: ``image_size``, or with ``train_region='whole'`` the
    square that holds the longest side kept, ``ceil(image_size * max_aspect)``."""
    region, aspect = train_region(data_cfg)
    if region == "square":
        return int(data_cfg.image_size)
    return int(math.ceil(data_cfg.image_size * aspect - 1e-9))


def train_fields(data_cfg: ml_collections.ConfigDict) -> dict[str, Field]:
    """The fields of the *training* examples: :func:`source_fields`, with
    ``train_region='whole'`` the image on its canvas (:func:`canvas_size`) and ``image_hw``,
    int32 ``[2]``, the height and width of the image within it (at the top left)."""
    fields = source_fields(data_cfg)
    if train_region(data_cfg)[0] == "whole":
        side = canvas_size(data_cfg)
        fields["image"] = Field((side, side, 3), "uint8")
        fields["image_hw"] = Field((2,), "int32")
    return fields


def resolve_source(data_cfg: ml_collections.ConfigDict) -> str:
    """The source `make_source` reads for this config: 'builtin', 'tfds' or 'folder'."""
    name, source, root = data_cfg.name, data_cfg.source, data_cfg.get("root", "")
    if source not in SOURCES:
        raise DataError(f"unknown data.source {source!r}: choose one of {', '.join(SOURCES)}.")
    if source == "builtin":
        if name != "digits":
            raise DataError(f"the built-in source has only name 'digits', got data.name={name!r}: "
                            "set --config.data.name=digits or another --config.data.source.")
        return "builtin"
    if source in ("tfds", "folder"):
        return source
    if name == "digits":
        if root:
            raise DataError(f"data.name='digits' is the built-in dataset but data.root={root!r} "
                            "is set: pass --config.data.name=folder to read that image folder, "
                            "or clear --config.data.root.")
        return "builtin"
    if name == "folder":
        return "folder"
    data_dir = resolve_data_dir(data_cfg)
    builder, reason = _tfds_builder(name, data_dir)
    if builder is not None:
        return "tfds"
    if root:
        return "folder"
    raise DataError(f"no data for data.name={name!r}: {reason} and data.root is empty. Either "
                    f"{_tfds_build_hint(name, data_dir)}, {_folder_hint(name)}.")


# The class that reads each kind of source (tests substitute one that declares more fields).
SOURCE_CLASSES: dict[str, type] = {"builtin": TfdsSource, "tfds": TfdsSource,
                                   "folder": ImageFolderSource}


def source_fields(data_cfg: ml_collections.ConfigDict) -> dict[str, Field]:
    """The fields (name -> :class:`Field`) of the examples the pipeline emits for this config,
    as the source's class declares them. Reads no data, so that a state's layout can be built
    where the data is absent (``source='auto'`` between TFDS and a folder is resolved only if
    their classes declare different fields)."""
    check_data_config(data_cfg)
    source, name = data_cfg.source, data_cfg.name
    if source == "auto" and name not in ("digits", "folder"):
        candidates = [SOURCE_CLASSES[kind].fields(data_cfg) for kind in ("tfds", "folder")]
        if candidates[0] == candidates[1]:
            return dict(candidates[0])
    return dict(SOURCE_CLASSES[resolve_source(data_cfg)].fields(data_cfg))


GREY_MODES = ("1", "L", "LA", "I", "F")  # Pillow modes of single-channel (greyscale) images


def source_channels(data_cfg: ml_collections.ConfigDict) -> int | None:
    """Colour channels of the source's images as stored, before the pipeline makes every image
    RGB (a greyscale one as 3 equal channels): 1 for the built-in digits (8x8 greyscale), the
    last dimension of a TFDS dataset's image feature, for an image folder 1 when its first
    training image is greyscale (Pillow mode in :data:`GREY_MODES` or 16-bit ``I;16*``) else
    3; None when the source cannot be found here (the pipeline then names what is missing).
    A colour task (colorization) refuses a single-channel source before compiling."""
    try:
        kind = resolve_source(data_cfg)
        if kind == "builtin":
            from ssl_jax.data import digits

            return int(digits.IMAGE_SHAPE[-1])
        if kind == "tfds":
            builder, _ = _tfds_builder(data_cfg.name, resolve_data_dir(data_cfg))
            keys = builder.info.supervised_keys if builder is not None else None
            image_key = keys[0] if isinstance(keys, tuple) and len(keys) == 2 else "image"
            shape = builder.info.features[image_key].shape if builder is not None else ()
            return int(shape[-1]) if shape and shape[-1] else None
        source = ImageFolderSource(data_cfg.root, data_cfg.train_split)
    except (DataError, KeyError, AttributeError):
        return None
    from PIL import Image

    with Image.open(source.path(0)) as image:
        grey = image.mode in GREY_MODES or image.mode.startswith("I;")
    return 1 if grey else 3


def make_source(data_cfg: ml_collections.ConfigDict, split: str) -> TfdsSource | ImageFolderSource:
    """A random-access source over `split` of the dataset that `data_cfg` names.

    Returns:
      `source[i]` is `{'image': uint8 [h, w, c] or encoded bytes, 'label': int, 'id': str}`;
      `len(source)` examples; `source.num_classes` classes.

    Raises:
      DataError: unknown source, data not prepared or not found, split missing, empty folder,
        a bad image_size / num_workers / prefetch.
    """
    check_data_config(data_cfg)
    kind = resolve_source(data_cfg)
    data_dir = resolve_data_dir(data_cfg)
    if kind == "builtin":
        from ssl_jax.data import digits

        return _wrap_tfds(digits.prepare(data_dir), "digits", split)
    if kind == "folder":
        return SOURCE_CLASSES["folder"](data_cfg.root, split, class_split=data_cfg.train_split)
    builder, reason = _tfds_builder(data_cfg.name, data_dir)
    if builder is None:
        raise DataError(f"{reason}: {_tfds_build_hint(data_cfg.name, data_dir)}, "
                        f"{_folder_hint(data_cfg.name, '--config.data.source=folder ')}.")
    return _wrap_tfds(builder, data_cfg.name, split)
