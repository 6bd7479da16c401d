"""A run's frozen encoder from a plain script or a notebook: restore it, embed images or a whole
split, save the features for one's own analyses.

    from ssl_jax.evaluate import frozen

    encoder = frozen.load_encoder("/path/to/run")          # the latest checkpoint
    feats = encoder.embed(images)                          # uint8 [n, h, w, 3] -> [n, d]
    test_x, test_y = encoder.embed_split("test")           # the run's test split
    cifar_x, cifar_y = encoder.embed_split("test", data="cifar10", data_root="/data/cifar10")
    frozen.save_features("feats.npz", {"test_features": test_x, "test_labels": test_y})

No ``absl.app.run`` or flag parsing is needed. A script whose run reads its data with Grain worker
processes (``data.num_workers > 0``) must, as any Python program that starts processes by
``spawn``, call its code under ``if __name__ == "__main__":``.

Images go through the evaluation's view (``ssl_jax.data.augment.eval_view``: the centre 87.5%
when larger than the run's crop, resized to it, normalised) and the method's ``encoder_input``,
exactly as in ``python -m ssl_jax.evaluate``.

Transfer (``eval.data``): another dataset than the run's is read with the run's machine settings
(data dir, workers, read threads) and decoded at the run's ``data.image_size``, so that it takes
the same evaluation view as the run's own data: :func:`transfer_data_config`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath
from jax.sharding import Mesh

from ssl_jax import config as config_lib
from ssl_jax import parallel, presets
from ssl_jax.config import ConfigError
from ssl_jax.data import sources
from ssl_jax.data.augment import eval_view
from ssl_jax.evaluate import features as features_lib
from ssl_jax.restore import load_run_config

# What a transfer dataset keeps of the run's data config: where data lies and how it is read.
_MACHINE_KEYS = ("data_dir", "image_size", "num_workers", "prefetch", "read_threads")


@dataclasses.dataclass
class FrozenEncoder:
    """A run's encoder with its variables, ready to embed. ``config`` is the run's (with any
    overrides), ``step`` the checkpoint's (-1 for a random initialisation)."""

    method: Any
    variables: Any
    config: ml_collections.ConfigDict
    mesh: Mesh
    step: int

    @property
    def crop_size(self) -> int:
        return int(self.config.aug.view1.size)

    def embed(self, images: np.ndarray, batch_size: int = 0) -> np.ndarray:
        """``[n, d]`` float32 features of uint8 images ``[n, h, w, 3]`` (square, any side: the
        evaluation view crops and resizes them), ``batch_size`` at a time (0: the run's
        ``eval.batch_size``). One process: the images are all this process's."""
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3 or images.shape[1] != images.shape[2]:
            raise ValueError(f"images must be square RGB [n, side, side, 3], got {images.shape}")
        if images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 pixels, got {images.dtype}")
        size = self.mesh.size
        batch = batch_size or self.config.eval.batch_size
        batch = -(-batch // size) * size  # a multiple of the device count
        embed = _embed_fn(self.method, self.crop_size)
        out = []
        for start in range(0, len(images), batch):
            chunk = images[start : start + batch]
            padded = np.zeros((batch, *chunk.shape[1:]), np.uint8)
            padded[: len(chunk)] = chunk
            x = parallel.global_batch({"image": padded}, self.mesh)["image"]
            out.append(np.asarray(embed(self.variables, x), np.float32)[: len(chunk)])
        if not out:
            return np.zeros((0, self.num_features), np.float32)
        return np.concatenate(out)

    @property
    def num_features(self) -> int:
        x = jax.ShapeDtypeStruct((1, self.crop_size, self.crop_size, 3), np.uint8)
        return int(jax.eval_shape(_embed_fn(self.method, self.crop_size), self.variables,
                                  x).shape[-1])

    def embed_split(self, split: str = "test", data: str = "", data_root: str = ""
                    ) -> tuple[np.ndarray, np.ndarray]:
        """``(features [n, d] float32, labels [n] int32)`` of every example of ``split`` of the
        run's dataset, or of the dataset ``data`` (a name as ``data.name``, ``'folder'`` with
        ``data_root``; see :func:`transfer_data_config`)."""
        config = self.config
        if data:
            config = with_data(config, transfer_data_config(config, data, data_root))
        return features_lib.extract_features(self.method.encoder, self.variables, config, split,
                                             self.mesh, self.method.encoder_input)


def _embed_fn(method: Any, crop: int):
    return jax.jit(lambda v, images: method.encoder.apply(
        v, method.encoder_input(eval_view(images, crop)), train=False))


def load_encoder(workdir: epath.PathLike, step: int = -1, overrides: Iterable[str] = (),
                 mesh: Mesh | None = None) -> FrozenEncoder:
    """The encoder of the run in ``workdir`` at checkpoint ``step`` (-1: the newest readable);
    ``overrides`` as the evaluation job's ``--config.KEY=VALUE`` without ``--config.`` (e.g.
    ``"data.root=/new/place"``, ``"eval.batch_size=512"``)."""
    config = load_run_config(workdir)
    config_lib.apply_overrides(config, list(overrides))
    mesh = mesh or parallel.make_mesh(config.mesh.fsdp)
    method, variables, step = features_lib.restore_encoder(workdir, config, mesh, step)
    return FrozenEncoder(method, variables, config, mesh, int(step))


def random_encoder(config: ml_collections.ConfigDict, seed: int = 1, mesh: Mesh | None = None
                   ) -> FrozenEncoder:
    """A randomly initialised encoder of ``config``'s method and architecture (a baseline)."""
    mesh = mesh or parallel.make_mesh(config.mesh.fsdp)
    method, variables = features_lib.random_encoder(config, mesh, seed)
    return FrozenEncoder(method, variables, config, mesh, -1)


def transfer_data_config(config: ml_collections.ConfigDict, name: str, root: str = ""
                         ) -> ml_collections.ConfigDict:
    """The data config of dataset ``name`` (as ``data.name``: ``'digits'``, a TFDS name such as
    ``'cifar10'`` prepared in the data dir, or an image folder at ``root``; ``'folder'`` for any
    folder) read with the run's machine settings and decoded at its ``data.image_size``. A name
    that resolves to no data is a ConfigError naming ``eval.data`` / ``eval.data_root``."""
    data = presets.data_config(name=name, root=root, source="auto",
                               **{k: config.data[k] for k in _MACHINE_KEYS})
    try:
        sources.resolve_source(data)
    except sources.DataError as e:
        known = ", ".join([*presets.DATASETS, "folder"])
        raise ConfigError(
            f"config.eval.data={name!r} (with eval.data_root={root!r}) names no data available "
            f"here: {e} Pass one of {known} (a dataset other than digits needs it prepared for "
            "TFDS or --config.eval.data_root=ROOT of an image folder ROOT/SPLIT/CLASS/*.jpg)"
        ) from None
    if name == "folder" and not root:
        raise ConfigError("config.eval.data='folder' needs --config.eval.data_root=ROOT (an "
                          "image folder ROOT/SPLIT/CLASS/*.jpg)")
    return data


def with_data(config: ml_collections.ConfigDict, data: ml_collections.ConfigDict
              ) -> ml_collections.ConfigDict:
    """A copy of ``config`` whose ``data`` block is ``data``."""
    out = config_lib.from_json(config_lib.to_json(config))
    with out.unlocked():
        out.data = data
    return out


def check_export_target(path: str, overwrite: bool) -> epath.Path:
    """The export file ``path`` (``.npz`` added when missing) if it may be written: an existing
    file is refused unless ``overwrite`` (a ConfigError naming ``eval.export_features``)."""
    target = epath.Path(path if path.endswith(".npz") else f"{path}.npz")
    if target.exists() and not overwrite:
        raise ConfigError(
            f"config.eval.export_features={path!r}: {target} exists; choose another path or "
            "pass --config.eval.export_overwrite=true to replace it")
    if target.is_dir():
        raise ConfigError(f"config.eval.export_features={path!r} is a directory: name a file")
    return target


def save_features(path: epath.PathLike, arrays: dict[str, Any], overwrite: bool = False
                  ) -> str:
    """Writes ``arrays`` (name -> array; strings become 0-d unicode arrays, no pickles) to the
    ``.npz`` file ``path`` at once (a temporary file renamed over it: a failed write leaves no
    partial file). An existing file is refused unless ``overwrite``. Returns the path;
    ``np.load(path)`` reads it back."""
    target = check_export_target(os.fspath(path), overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp{os.getpid()}"
    try:
        with tmp.open("wb") as f:
            np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()})
        tmp.replace(target)
    finally:
        if tmp.exists():
            tmp.unlink()
    return str(target)
