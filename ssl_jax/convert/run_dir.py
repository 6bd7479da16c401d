"""A weights file as a run directory, and a run's encoder as a timm file.

:func:`import_weights` writes ``WORKDIR/config.json``, ``WORKDIR/checkpoints/0/`` (the whole
train state of the config's method, its encoder, and the heads the file has, from the file:
:mod:`ssl_jax.convert.init_from`) and ``WORKDIR/imported.json`` (the source, its SHA-256, what
was read, renamed, resampled, dropped or left new). The evaluation job
(``python -m ssl_jax.evaluate --workdir WORKDIR``) and fine-tuning
(``python -m ssl_jax.finetune --workdir WORKDIR``) read it as any run; pre-training continues
from it in a new workdir with ``--config.init_from=WORKDIR`` (the trainer does not resume an
imported run: it has no data position). Everything is read and checked before anything is
written; the directory is written beside the target and renamed into place when complete.

:func:`export_timm` writes a run's encoder (the one evaluation uses: DINO's teacher, ...) as a
timm ``state_dict`` in safetensors, with ``FILE.json`` beside it (and in the file's metadata):
the timm model name, its kwargs and the lines that complete it (:mod:`.timm_export`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Any

import jax
import ml_collections
import numpy as np

from ssl_jax import checkpoint, methods, parallel, restore
from ssl_jax import config as config_lib
from ssl_jax.config import ConfigError
from ssl_jax.convert import fit, formats, init_from, timm_export
from ssl_jax.convert.files import (
    WeightsError,
    read_weights,
    refuse_existing,
    write_json,
    write_safetensors,
)
from ssl_jax.step import build_state

IMPORT_STEP = 0


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _refuse_workdir(workdir: str, overwrite: bool) -> None:
    if os.path.isfile(workdir):
        raise WeightsError(f"--workdir {workdir} is a file; choose a directory")
    if os.path.isdir(workdir) and os.listdir(workdir) and not overwrite:
        raise WeightsError(f"--workdir {workdir} exists and is not empty: choose a new "
                           "directory, or pass --overwrite to replace it")


def fit_model_to_file(config: ml_collections.ConfigDict, weights: str, num_heads: int = 0,
                      allow_classes: bool = False, checkpoint_key: str = "") -> dict[str, Any]:
    """Sets ``config.model`` to the architecture of the encoder in ``weights`` (keeping the
    config's dtype, pooling, mask token, stochastic depth and init scheme); returns it."""
    parts = formats.parts_of(read_weights(weights, allow_classes), weights, checkpoint_key)
    model = fit.model_config(config.model.to_dict(), fit.infer_model(parts.encoder, num_heads))
    with config.unlocked():
        config.model = ml_collections.ConfigDict(model)
    return model


def model_from_init(config: ml_collections.ConfigDict, num_heads: int = 0) -> dict[str, Any]:
    """Sets ``config.model`` to the encoder of what ``config.init_from`` names: a run's model
    (the config's dtype, pooling, mask token, stochastic depth and init scheme kept), or the
    architecture of a weights file (:func:`fit_model_to_file`); returns it. The trainer's
    ``--model_from_init``."""
    path = config.get("init_from", "")
    if not path:
        raise ConfigError("--model_from_init takes the model from config.init_from, which is "
                          "empty: pass --config.init_from=RUN_OR_FILE")
    if not os.path.isdir(path):
        return fit_model_to_file(config, path, num_heads)
    run_model = restore.load_run_config(path).model.to_dict()
    family = fit.RESNET_ARCH_FIELDS if run_model["name"].startswith("resnet") \
        else fit.VIT_ARCH_FIELDS
    model = fit.model_config(config.model.to_dict(),
                             {k: v for k, v in run_model.items() if k in family})
    with config.unlocked():
        config.model = ml_collections.ConfigDict(model)
    return model


def import_weights(weights: str, config: ml_collections.ConfigDict, workdir: str, *,
                   overwrite: bool = False, allow_classes: bool = False,
                   checkpoint_key: str = "") -> dict[str, Any]:
    """Writes the run directory ``workdir`` from ``weights`` for ``config`` (see the module
    docstring); returns the import's record (``imported.json``)."""
    workdir = os.path.abspath(workdir)
    _refuse_workdir(workdir, overwrite)
    with config.unlocked():
        config.init_from = ""  # the run holds the weights; init_from names where they came from
    mesh = parallel.make_mesh(config.mesh.fsdp)
    method = methods.create(config, mesh)
    setup = build_state(config, mesh, method, total_steps=1, steps_per_epoch=1)
    source = init_from.prepare(weights, method, setup.abstract, mesh, allow_classes,
                               checkpoint_key)
    state = jax.jit(setup.init_state, out_shardings=setup.shardings)(
        jax.random.key(config.seed))
    state = source.apply(state, method, mesh)
    record = {"source": os.path.abspath(weights), "sha256": sha256(weights),
              "method": config.method, "model": config.model.to_dict(), "step": IMPORT_STEP,
              "notes": source.notes,
              "use": f"python -m ssl_jax.evaluate --workdir {workdir}; continued pre-training: "
                     f"--config.init_from={workdir} with a new --workdir"}
    parent = os.path.dirname(workdir)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(workdir)}.importing-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(os.path.join(tmp, "checkpoints"))
        with open(os.path.join(tmp, "config.json"), "w") as f:
            f.write(config_lib.to_json(config))
        checkpoint.write_state(os.path.join(tmp, "checkpoints", str(IMPORT_STEP)), state)
        write_json(os.path.join(tmp, init_from.IMPORTED_MARKER), record)
        if os.path.exists(workdir):
            shutil.rmtree(workdir)
        os.rename(tmp, workdir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return record


def export_timm(workdir: str, output: str, *, step: int = -1, overwrite: bool = False
                ) -> dict[str, Any]:
    """Writes the encoder of the run ``workdir`` (checkpoint ``step``, -1: the latest) to
    ``output`` (safetensors) and ``output + '.json'`` (how timm builds it); returns that spec
    with the step and the source."""
    if not output.endswith(".safetensors"):
        raise WeightsError(f"--output {output} must end in .safetensors")
    spec_path = output + ".json"
    refuse_existing([output, spec_path], overwrite)
    config = restore.load_run_config(workdir)
    mesh = parallel.make_mesh(config.mesh.fsdp)
    method = restore.create_method(config, mesh)
    spec = timm_export.timm_spec(method.encoder)
    _, state, step = restore.restore_state(workdir, config, mesh, step)
    variables = jax.tree_util.tree_map(np.asarray, jax.device_get(
        method.encoder_variables(state["params"], state["extra"])))
    tensors = timm_export.timm_tensors(method.encoder, variables)
    spec = {**spec, "source": os.path.abspath(workdir), "step": int(step),
            "method": config.method, "model": config.model.to_dict(),
            "image_size": int(config.aug.view1.size),
            "input": "NCHW float32, RGB in [0, 1] normalised with the ImageNet mean and std "
                     "(ssl_jax.data.augment.normalize), as the run's evaluation feeds it"}
    write_safetensors(output, tensors, {"timm_spec": json.dumps(spec, default=str)})
    write_json(spec_path, spec)
    return spec
