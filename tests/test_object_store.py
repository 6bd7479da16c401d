"""A workdir on an object store (``gs://...``): the project's own files go through etils' epath
without local-only operations (no append, no ``str(path)`` handed to a library that opens it).

A fake bucket maps ``gs://bucket/...`` to a local folder through epath's mock backend, so the
test runs offline; Orbax's arrays go through TensorStore's own gcs driver and are not covered
here (TensorStore's business).
"""

import json
import os

import numpy as np
from etils import epath
from etils.epath import backend
from etils.epath.testing import mock_epath
from PIL import Image

from ssl_jax import checkpoint as ckpt_lib
from ssl_jax.evaluate.pictures import save_png
from ssl_jax.metrics import MetricsWriter, update_results

BUCKET = "gs://bucket"
METHODS = ("open", "exists", "isdir", "listdir", "glob", "makedirs", "mkdir", "remove",
           "rename", "replace", "rmtree", "stat")


class FakeBucket:
    """Routes ``gs://bucket/X`` to ``root/X`` on the local disk; records the open modes."""

    def __init__(self, root):
        self.root, self.modes = root, []

    def local(self, path) -> str:
        text = os.fspath(path)
        assert text.startswith(BUCKET + "/"), f"a local path reached the object store: {text}"
        return os.path.join(self.root, text[len(BUCKET) + 1:])

    def method(self, name):
        def call(original, path, *args, **kwargs):
            if name == "open":
                self.modes.append(kwargs.get("mode", args[0] if args else "r"))
            if name in ("rename", "replace"):
                args = (self.local(args[0]), *args[1:])
            return getattr(backend.os_backend, name)(self.local(path), *args, **kwargs)
        return call

    def mock(self):
        return mock_epath(**{name: self.method(name) for name in METHODS})


def test_workdir_uri_is_kept():
    assert os.fspath(ckpt_lib.workdir_path("gs://bucket/runs/a")) == "gs://bucket/runs/a"
    assert os.path.isabs(os.fspath(ckpt_lib.workdir_path("runs/a")))


def test_metrics_on_a_bucket_are_rewritten_not_appended(tmp_path):
    bucket = FakeBucket(tmp_path)
    workdir = epath.Path(BUCKET) / "run"
    with bucket.mock():
        workdir.mkdir(parents=True)
        (workdir / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 3.0}) + "\n")
        writer = MetricsWriter(workdir, enabled=True, tensorboard=False)  # a resumed run
        writer.write(2, {"loss": 2.0})
        writer.write(3, {"loss": float("nan")})
        writer.close()
    assert "a" not in "".join(bucket.modes), bucket.modes  # object stores cannot append
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text()
            .splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[1]["loss"] == 2.0 and rows[2]["loss"] == "nan"


def test_local_metrics_append(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1}) + "\n")
    writer = MetricsWriter(tmp_path, enabled=True, tensorboard=False)
    writer.write(2, {"loss": 1.0})
    writer.close()
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


def test_pictures_are_written_through_epath(tmp_path):
    bucket = FakeBucket(tmp_path)
    image = Image.fromarray(np.full((4, 6, 3), 200, np.uint8))
    with bucket.mock():
        (epath.Path(BUCKET) / "run").mkdir(parents=True)
        save_png(image, epath.Path(BUCKET) / "run" / "picture.png")
    with Image.open(tmp_path / "run" / "picture.png") as read:
        assert read.size == (6, 4) and read.format == "PNG"


def test_results_file_keeps_other_entries_and_sets_a_broken_file_aside(tmp_path):
    bucket = FakeBucket(tmp_path)
    path = epath.Path(BUCKET) / "run" / "eval.json"
    with bucket.mock():
        path.parent.mkdir(parents=True)
        update_results(path, {"step_3": {"top1": 0.5}, "latest": {"top1": 0.5}})
        whole = update_results(path, {"step_6": {"top1": 0.7}, "latest": {"top1": 0.7}})
    assert whole == json.loads((tmp_path / "run" / "eval.json").read_text())
    assert whole == {"step_3": {"top1": 0.5}, "step_6": {"top1": 0.7}, "latest": {"top1": 0.7}}
    assert "a" not in "".join(bucket.modes), bucket.modes
    for broken in ("[1, 2]", "{not json"):  # valid JSON but not an object; not JSON at all
        (tmp_path / "run" / "eval.json").write_text(broken)
        with bucket.mock():
            assert update_results(path, {"step_9": {"top1": 0.9}}) == {"step_9": {"top1": 0.9}}
        kept = sorted((tmp_path / "run").glob("eval.unreadable-*.json"))
        assert kept and kept[-1].read_text() == broken
        for old in kept:
            old.unlink()
    assert not list((tmp_path / "run").glob("*.tmp*"))
