"""Tests for ssl_jax.data: the digits builder, the sources and the Grain pipeline."""

import io
import logging
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from ssl_jax import presets
from ssl_jax.config import ConfigError
from ssl_jax.data import digits, pipeline, sources
from ssl_jax.data.sources import DataError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    digits.prepare(data_dir)
    return data_dir


def _digits_cfg(data_dir, **kw):
    return presets.data_config(data_dir=data_dir, **kw)


def _save(path, array, fmt=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.asarray(array, np.uint8)).save(path, format=fmt)


def _png(array):
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(array, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _colour(i):
    """A distinct RGB colour per integer i < 216, exact through PNG."""
    return np.array([40 * (i % 6), 40 * (i // 6 % 6), 40 * (i // 36 % 6)], np.uint8)


def _colour_folder(root, n, num_classes=3, split="train"):
    """root/split/cNN/iNN.png, image i a 6x6 square of _colour(i); class i % num_classes."""
    for i in range(n):
        _save(os.path.join(root, split, f"c{i % num_classes}", f"i{i:02d}.png"),
              np.broadcast_to(_colour(i), (6, 6, 3)))
    return presets.data_config(name="folder", root=str(root), image_size=4)


def _ids(images):
    """Record ids back from the colours of decoded images `[n, s, s, 3]`."""
    c = images[:, 0, 0, :].astype(int) // 40
    return (c[:, 0] + 6 * c[:, 1] + 36 * c[:, 2]).tolist()


# --- The built-in digits ------------------------------------------------------------------------

def test_digits_builder_sizes_dtype_and_range(digits_dir):
    builder = digits.prepare(digits_dir)
    assert builder.info.splits["train"].num_examples == 1437
    assert builder.info.splits["test"].num_examples == 360
    assert builder.info.features["label"].num_classes == 10
    assert builder.info.file_format.value == "array_record"
    train = sources.make_source(_digits_cfg(digits_dir), "train")
    assert len(train) == 1437 and train.num_classes == 10
    images = np.stack([train[i]["image"] for i in range(len(train))])
    assert images.dtype == np.uint8 and images.shape == (1437, 8, 8, 1)
    assert images.min() == 0 and images.max() == 255
    # Pixels are round(p * 255 / 16) of integers p in 0..16.
    assert set(np.unique(images)) <= {round(p * 255 / 16) for p in range(17)}


def test_digits_split_is_fixed_stratified_and_stored(digits_dir):
    images, labels = digits.load_digits_uint8()
    test_idx = digits.stratified_test_indices(labels)
    assert test_idx.size == 360 and np.unique(test_idx).size == 360
    # Pinned: the split must not drift with library versions.
    assert test_idx[:10].tolist() == [1, 15, 20, 21, 23, 27, 29, 37, 43, 78]
    np.testing.assert_array_equal(test_idx, digits.stratified_test_indices(labels))
    per_class = np.bincount(labels[test_idx], minlength=10)
    np.testing.assert_allclose(per_class, 0.2 * np.bincount(labels), atol=1.0)
    # The stored test split holds exactly those examples (as a multiset of image+label).
    test = sources.make_source(_digits_cfg(digits_dir), "test")
    stored = sorted(test[i]["image"].tobytes() + bytes([test[i]["label"]]) for i in range(360))
    expected = sorted(images[i].tobytes() + bytes([labels[i]]) for i in test_idx)
    assert stored == expected


def test_digits_prepare_twice_at_once(tmp_path):
    script = textwrap.dedent(f"""
        import sys
        from ssl_jax.data import digits
        b = digits.prepare({str(tmp_path)!r})
        assert b.info.splits["train"].num_examples == 1437, b.info.splits
        assert "tensorflow" not in sys.modules
    """)
    env = dict(os.environ, PYTHONPATH=REPO)
    procs = [subprocess.Popen([sys.executable, "-c", script], env=env, stderr=subprocess.PIPE)
             for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()[-2000:]
    assert sorted(os.listdir(tmp_path / digits.NAME)) == ["1.0.0"]


# --- Sources ------------------------------------------------------------------------------------

def test_image_folder_source_classes_files_and_decoding(tmp_path):
    rng = np.random.default_rng(0)
    _save(tmp_path / "train/dog/b.JPG", rng.integers(0, 255, (20, 30, 3)))
    _save(tmp_path / "train/dog/a.jpeg", rng.integers(0, 255, (7, 7, 3)), fmt="JPEG")
    _save(tmp_path / "train/ant/x.PNG", np.full((9, 5), 77), fmt="PNG")  # grayscale
    wide = np.zeros((20, 40, 3), np.uint8)
    wide[:, :10], wide[:, 10:30], wide[:, 30:] = [0, 0, 255], [200, 10, 30], [0, 0, 255]
    _save(tmp_path / "train/cat/w.png", wide)
    (tmp_path / "train/cat/notes.txt").write_text("not an image")
    (tmp_path / "train/cat/.hidden.png").write_bytes(b"")
    _save(tmp_path / "test/cat/t.png", wide)
    cfg = presets.data_config(name="folder", root=str(tmp_path), image_size=8)
    train = sources.make_source(cfg, "train")
    assert train.classes == ("ant", "cat", "dog") and train.num_classes == 3
    assert list(train.files) == ["ant/x.PNG", "cat/w.png", "dog/a.jpeg", "dog/b.JPG"]
    assert train.labels.tolist() == [0, 1, 2, 2] and len(train) == 4
    assert train[3]["id"] == str(tmp_path / "train/dog/b.JPG")
    assert isinstance(train[3]["image"], bytes)
    # The test split maps classes with the training split's folders: cat is 1, not 0.
    test = sources.make_source(cfg, "test")
    assert test.labels.tolist() == [1] and test.num_classes == 3
    decoded = pipeline.DecodedSource(train, 8)
    gray = decoded[0]["image"]
    assert gray.shape == (8, 8, 3) and gray.dtype == np.uint8
    np.testing.assert_array_equal(gray, np.full((8, 8, 3), 77))
    # Non-square: the centre of the wide image is what remains (its edges blend in the sides).
    centre = decoded[1]["image"][:, 2:6]
    np.testing.assert_array_equal(centre, np.broadcast_to([200, 10, 30], centre.shape))
    assert (decoded[1]["image"][:, [0, -1], 2] > 30).all()
    assert decoded[1]["label"] == 1 and decoded[1]["label"].dtype == np.int32


@pytest.mark.parametrize("shape, size", [((12, 20, 3), 6), ((60, 20, 3), 8), ((300, 200, 3), 32)])
def test_decode_image_is_shorter_side_resize_then_centre_crop(shape, size):
    image = np.random.default_rng(1).integers(0, 255, shape, dtype=np.uint8)
    scale = size / min(shape[:2])
    height, width = round(shape[0] * scale), round(shape[1] * scale)
    resized = np.asarray(Image.fromarray(image).resize((width, height), Image.BICUBIC))
    top, left = (height - size) // 2, (width - size) // 2
    reference = resized[top:top + size, left:left + size]
    np.testing.assert_array_equal(pipeline.decode_image(image, size), reference)
    np.testing.assert_array_equal(pipeline.decode_image(_png(image), size), reference)


def test_decode_image_arrays_and_errors():
    rng = np.random.default_rng(1)
    digit = rng.integers(0, 255, (8, 8, 1), dtype=np.uint8)
    up = pipeline.decode_image(digit, 32)
    assert up.shape == (32, 32, 3)
    np.testing.assert_array_equal(up[..., 0], up[..., 2])
    with pytest.raises(DataError, match="uint8"):
        pipeline.decode_image(digit.astype(np.float32), 32)
    with pytest.raises(pipeline.UndecodableImageError):
        pipeline.decode_image(b"garbage", 32)


class _TinyImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A TFDS dataset with an encoded `Image` feature, written without TensorFlow."""

    name = "ssl_jax_tiny_images"
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "label": tfds.features.ClassLabel(num_classes=4)}), supervised_keys=("image", "label"))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(6), "validation": self._generate_examples(2)}

    def _generate_examples(self, n):
        for i in range(n):
            image = _png(np.broadcast_to(_colour(i), (5 + i, 7, 3)))
            yield i, {"image": image, "label": i % 4}


def test_tfds_source_reads_encoded_images_without_tensorflow(tmp_path):
    _TinyImages(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    for source in ("tfds", "auto"):
        cfg = presets.data_config(name=_TinyImages.name, source=source, data_dir=str(tmp_path),
                                  image_size=4)
        assert sources.resolve_source(cfg) == "tfds"
        train = sources.make_source(cfg, "train")
        assert len(train) == 6 and train.num_classes == 4
        assert isinstance(train[0]["image"], bytes)
        decoded = pipeline.DecodedSource(train, 4)
        images = np.stack([decoded[j]["image"] for j in range(6)])
        assert (images == images[:, :1, :1]).all()  # each a solid colour, as written
        ids = _ids(images)
        assert sorted(ids) == list(range(6))
        assert [decoded[j]["label"] for j in range(6)] == [i % 4 for i in ids]
    with pytest.raises(DataError, match=r"split 'test'.*\['train', 'validation'\]"):
        sources.make_source(cfg, "test")
    assert "tensorflow" not in sys.modules


def test_unprepared_tfds_and_missing_cifar_name_the_fix(tmp_path):
    cfg = presets.data_config(name="cifar10", source="tfds", data_dir=str(tmp_path))
    with pytest.raises(DataError, match="tfds build cifar10 --file_format=array_record"):
        sources.make_source(cfg, "train")
    cfg = presets.data_config(name="cifar10", data_dir=str(tmp_path))
    with pytest.raises(DataError, match=r"cifar10-jpeg\.tar\.gz.*|--config\.data\.root") as e:
        sources.make_source(cfg, "train")
    assert "cifar10-jpeg.tar.gz" in str(e.value) and "--config.data.root" in str(e.value)
    # With a root, 'auto' falls back to the image folder.
    _colour_folder(tmp_path / "c10", 3)
    cfg.root = str(tmp_path / "c10")
    assert sources.resolve_source(cfg) == "folder" and len(sources.make_source(cfg, "train")) == 3


@pytest.mark.parametrize("layout, match", [
    ("missing", "does not exist"),
    ("empty", "split 'train' not found"),
    ("no_classes", "no class folders"),
    ("no_images", "no images"),
])
def test_image_folder_errors(tmp_path, layout, match):
    root = tmp_path / "data"
    if layout != "missing":
        root.mkdir()
    if layout in ("no_classes", "no_images"):
        (root / "train").mkdir()
    if layout == "no_images":
        (root / "train/cat").mkdir()
        (root / "train/cat/readme.txt").write_text("x")
    with pytest.raises(DataError, match=match):
        sources.make_source(presets.data_config(name="folder", root=str(root)), "train")


def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown data config key 'nmae'"):
        presets.data_config(nmae="digits")
    with pytest.raises(DataError, match="unknown data.source"):
        sources.make_source(presets.data_config(source="hdf5"), "train")
    with pytest.raises(DataError, match="data.root is empty"):
        sources.make_source(presets.data_config(name="folder"), "train")
    with pytest.raises(DataError, match="--config.data.name=folder"):
        sources.make_source(presets.data_config(root=str(tmp_path)), "train")


def test_missing_digits_split(digits_dir):
    with pytest.raises(DataError, match=r"split 'validation'.*\['train', 'test'\]"):
        sources.make_source(_digits_cfg(digits_dir), "validation")


# --- Training pipeline --------------------------------------------------------------------------

def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_train_loader_batches_determinism_and_state_restore(digits_dir):
    cfg = _digits_cfg(digits_dir, image_size=16)
    loader = pipeline.train_loader(cfg, global_batch_size=32, seed=7)
    it = iter(loader)
    first = _take(it, 5)
    assert first[0]["image"].shape == (32, 16, 16, 3) and first[0]["image"].dtype == np.uint8
    assert first[0]["label"].shape == (32,) and first[0]["label"].dtype == np.int32
    assert 0 <= first[0]["label"].min() and first[0]["label"].max() < 10
    state = it.get_state()
    after = _take(it, 3)
    resumed = iter(pipeline.train_loader(cfg, global_batch_size=32, seed=7))
    resumed.set_state(state)
    for a, b in zip(after, _take(resumed, 3), strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    again = _take(iter(pipeline.train_loader(cfg, global_batch_size=32, seed=7)), 5)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
    other = next(iter(pipeline.train_loader(cfg, global_batch_size=32, seed=8)))
    assert not np.array_equal(other["label"], first[0]["label"])


def test_train_shards_are_disjoint_cover_the_epoch_and_reshuffle(tmp_path):
    cfg = _colour_folder(tmp_path, 12)
    single = _ids(np.concatenate(
        [b["image"] for b in _take(iter(pipeline.train_loader(cfg, global_batch_size=4,
                                                              seed=0)), 6)]))
    assert sorted(single[:12]) == list(range(12)) and sorted(single[12:]) == list(range(12))
    assert single[:12] != single[12:]  # a new order every epoch
    per_process = [
        [_ids(b["image"]) for b in _take(iter(pipeline.train_loader(
            cfg, global_batch_size=4, seed=0, process_index=p, process_count=2)), 3)]
        for p in range(2)]
    seen = [sum(batches, []) for batches in per_process]
    assert not set(seen[0]) & set(seen[1]) and sorted(seen[0] + seen[1]) == list(range(12))
    # Global step t holds the same examples whatever the number of processes.
    for t in range(3):
        assert sorted(per_process[0][t] + per_process[1][t]) == sorted(single[4 * t:4 * t + 4])


def test_train_loader_errors(digits_dir):
    cfg = _digits_cfg(digits_dir)
    with pytest.raises(DataError, match="multiple of the number of processes"):
        pipeline.train_loader(cfg, global_batch_size=30, seed=0, process_count=4)
    with pytest.raises(DataError, match="exceeds the 1437 examples"):
        pipeline.train_loader(cfg, global_batch_size=2048, seed=0)
    with pytest.raises(DataError, match="process_index"):
        pipeline.train_loader(cfg, global_batch_size=32, seed=0, process_index=2, process_count=2)


# --- Evaluation pipeline ------------------------------------------------------------------------

def test_eval_batches_pad_and_mask(digits_dir):
    cfg = _digits_cfg(digits_dir, image_size=8)
    batches = list(pipeline.eval_batches(cfg, "test", batch_size=100))
    assert [int(b["mask"].sum()) for b in batches] == [100, 100, 100, 60]
    last = batches[-1]
    assert last["image"].shape == (100, 8, 8, 3) and last["mask"].dtype == bool
    assert not last["image"][60:].any() and not last["label"][60:].any()
    source = sources.make_source(cfg, "test")
    labels = np.concatenate([b["label"][b["mask"]] for b in batches])
    np.testing.assert_array_equal(labels, [source[i]["label"] for i in range(360)])
    first = pipeline.decode_image(source[0]["image"], 8)
    np.testing.assert_array_equal(batches[0]["image"][0], first)
    assert pipeline.num_examples(cfg, "test") == 360 and pipeline.num_classes(cfg) == 10


def test_eval_batches_split_contiguously_over_processes(digits_dir):
    cfg = _digits_cfg(digits_dir, image_size=8)
    whole = np.concatenate([b["label"] for b in pipeline.eval_batches(cfg, "test",
                                                                       batch_size=360)])
    shares = [list(pipeline.eval_batches(cfg, "test", batch_size=7 * 16, process_index=p,
                                         process_count=7)) for p in range(7)]
    assert {len(s) for s in shares} == {4}  # ceil(ceil(360 / 7) / 16) everywhere
    labels = np.concatenate([b["label"][b["mask"]] for s in shares for b in s])
    np.testing.assert_array_equal(labels, whole)
    assert [sum(int(b["mask"].sum()) for b in s) for s in shares] == [52] * 6 + [48]
    with pytest.raises(DataError, match="multiple of the number of processes"):
        pipeline.eval_batches(cfg, "test", batch_size=10, process_count=3)


# --- Undecodable images -------------------------------------------------------------------------

def test_corrupt_image_is_skipped_in_training_and_masked_in_eval(tmp_path, caplog):
    cfg = _colour_folder(tmp_path, 8, num_classes=2)
    bad = tmp_path / "train/c0/i99.jpg"
    bad.write_bytes(b"\xff\xd8 this is not a JPEG")
    with caplog.at_level(logging.WARNING):
        batch = next(iter(pipeline.train_loader(cfg, global_batch_size=8, seed=0)))
    assert sorted(_ids(batch["image"])) == list(range(8))
    assert str(bad) in caplog.text
    batches = list(pipeline.eval_batches(cfg, "train", batch_size=16))
    assert len(batches) == 1 and int(batches[0]["mask"].sum()) == 8
    bad_row = sources.make_source(cfg, "train").files.index("c0/i99.jpg")
    assert not batches[0]["mask"][bad_row]


def test_mostly_corrupt_folder_raises(tmp_path):
    cfg = _colour_folder(tmp_path, 2, num_classes=1)
    for i in range(pipeline.CORRUPT_GRACE + 2):
        (tmp_path / f"train/c0/bad{i}.png").write_bytes(b"nope")
    with pytest.raises(DataError, match="could not be decoded"):
        next(iter(pipeline.train_loader(cfg, global_batch_size=2, seed=0)))
