r"""The fine-tuning job: a run's encoder, a linear classifier, trained end to end on the labels.

    python -m ssl_jax.finetune --workdir RUN [--config configs/finetune.py:ARG] [--config.K=V ...]

It reads ``RUN/config.json``, restores the encoder of the chosen checkpoint (``config.step``,
-1: the latest) the way the evaluation job does (any method: SimCLR, DINO, MAE, ...), or with
``from_scratch=True`` initialises the same architecture at random (the baseline at the same
budget). It adds a classifier (``pool='gap'``: mean of the patch tokens + LayerNorm, MAE's; or
``'cls'``: the cls token; ResNets are average-pooled) and trains everything with AdamW (or any
``optim.name``), linear warm-up and cosine decay, layer-wise learning-rate decay
(``optim.layer_decay``), stochastic depth (``drop_path_rate``, ViTs), label smoothing, mixup and
cutmix, on random resized crops with flips. ``label_fraction`` < 1 keeps that class-balanced share
of the training labels, seeded (SimCLR's semi-supervised protocol). It then reports top-1 on the
test split (centre view, as the evaluation job) and prints every result of the run as a table.

Results go to ``RUN/finetune.json``, one entry per ``"pretrained@step{N},label_fraction={f}"``
or ``"from_scratch,label_fraction={f}"`` (``,seed={s}`` when the seed is not 0); a new entry
is added atomically and the others are kept, so the baseline and every label fraction sit side
by side (re-running the same one replaces its entry). The pre-training run's checkpoints are
opened read-only; each fine-tuning keeps its own run in ``RUN/finetune/<entry name, sanitised>/``
(:func:`finetune_dir`): ``config.json`` (the fine-tuning config, written once),
``checkpoints/<step>/`` (Orbax: the whole state and the data position, every
``checkpoint.every_steps`` and at the end), ``metrics.jsonl`` and TensorBoard files. It has the
pre-training loop's guarantees (:mod:`ssl_jax.loop`): the same command resumes a killed
fine-tuning from its newest checkpoint and ends bit for bit as an uninterrupted one (on CPU);
SIGTERM saves the current step and exits with 75; a non-finite step is skipped
(``on_nonfinite='skip'``) or stops the job with exit code 4 (``'stop'``). Re-running a finished
fine-tuning only evaluates its last checkpoint again; remove its folder to train it afresh. A
folder that holds a fine-tuning of another method, model or pool is refused (exit code 2).
Mistakes (a ``--config.model`` override or an ``image_size`` that does not fit the checkpoint's
encoder, a label fraction that leaves a class empty) stop the job before anything is written.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import flags, logging
from etils import epath

from ssl_jax import checkpoint as ckpt_lib
from ssl_jax import config as config_lib
from ssl_jax import faults, flops, loop, methods, optim, parallel
from ssl_jax import metrics as metrics_lib
from ssl_jax.config import ConfigError, require
from ssl_jax.data import augment, pipeline
from ssl_jax.evaluate.features import restore_encoder
from ssl_jax.finetuning import classifier as classifier_lib
from ssl_jax.finetuning import data as finetune_data
from ssl_jax.finetuning import default_config
from ssl_jax.finetuning.steps import evaluate_top1, make_train_step
from ssl_jax.metrics import MetricsWriter

RESULTS_FILE = "finetune.json"
FINETUNE_DIR = "finetune"  # RUN/finetune/<entry name>/: each fine-tuning's own run
RECIPES = ("digits", "cifar10", "imagenet2012")
# Keys the job takes from the run's config.json (overridable; a changed model is refused).
RUN_KEYS = ("method", "model", "data", "mesh", "sharding_rules")
# Keys whose change makes a fine-tuning's checkpoints unusable (with the run's method and model).
FINETUNE_IDENTITY_KEYS = ("pool",)

_OVERRIDES: list[str] = []


# --- Config ---------------------------------------------------------------------------------


def load_config(
    workdir: epath.PathLike, config_arg: str | None = None, overrides: list[str] = ()
) -> tuple[ml_collections.ConfigDict, ml_collections.ConfigDict]:
    """``(fine-tuning config, run config)``: the fine-tuning config file (default: the recipe of
    the run's dataset, from :mod:`ssl_jax.finetuning.default_config`) plus the run's
    :data:`RUN_KEYS`, then the overrides."""
    run = ckpt_lib.load_run_config(workdir)
    if config_arg:
        path, _, arg = config_arg.partition(":")
    else:
        if run.data.name not in RECIPES:
            raise ConfigError(
                f"the run's data.name={run.data.name!r} has no fine-tuning recipe of its own: "
                f"pass --config configs/finetune.py:data={'|'.join(RECIPES)}")
        path, arg = None, f"data={run.data.name},method={run.method}"
    config = default_config.get_config(arg) if path is None else _load_config_file(path, arg)
    with config.unlocked():
        for key in RUN_KEYS:
            value = run.get(key)
            if isinstance(value, ml_collections.ConfigDict):
                value = ml_collections.ConfigDict(value.to_dict())
            if value is not None:
                config[key] = value
        if "model" in config and "dtype" not in config.model:  # runs saved before the key
            config.model.dtype = "float32"
    config_lib.apply_overrides(config, overrides)
    if config.get("recipe") not in (None, run.data.name):
        logging.warning("the fine-tuning recipe is for %s but the run's data is %s",
                        config.recipe, run.data.name)
    if config.get("recipe_method") not in (None, run.method) and "beit" in (
            config.recipe_method, run.method):
        logging.warning("the fine-tuning recipe is %s's but the run is a %s run",
                        config.recipe_method, run.method)
    return config, run


def _load_config_file(path: str, arg: str) -> ml_collections.ConfigDict:
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} not found; e.g. --config "
                          "configs/finetune.py:data=digits")
    spec = importlib.util.spec_from_file_location("ssl_jax_finetune_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg or None)


def check_config(config: ml_collections.ConfigDict, mesh: Any) -> None:
    """The job's own keys, before any data is read."""
    for key in ("batch_size", "eval_batch_size"):
        require(config[key] > 0 and config[key] % mesh.size == 0, key,
                f"must be a positive multiple of the device count {mesh.size}")
    require(config.num_epochs > 0 or config.total_steps > 0, "num_epochs",
            "set num_epochs or total_steps to a positive number")
    require(config.log_every > 0, "log_every", "must be > 0")
    require(config.checkpoint.every_steps > 0, "checkpoint.every_steps", "must be > 0")
    require(config.on_nonfinite in ("skip", "stop"), "on_nonfinite", "must be 'skip' or 'stop'")
    require(0.0 < config.label_fraction <= 1.0, "label_fraction",
            f"must lie in (0, 1], got {config.label_fraction!r}")
    require(0.0 <= config.label_smoothing < 1.0, "label_smoothing", "must lie in [0, 1)")
    require(0.0 <= config.drop_path_rate < 1.0, "drop_path_rate", "must lie in [0, 1)")
    require(config.image_size >= 0, "image_size", "must be >= 0 (0: the pre-training size)")
    require(config.pool in classifier_lib.POOLS, "pool",
            f"must be one of {classifier_lib.POOLS}")
    for key in ("mixup_alpha", "cutmix_alpha"):
        require(config.mixup[key] >= 0, f"mixup.{key}", "must be >= 0 (0 disables it)")
    for key in ("prob", "switch_prob"):
        require(0.0 <= config.mixup[key] <= 1.0, f"mixup.{key}", "must lie in [0, 1]")
    decay = config.optim.get("layer_decay", 1.0)
    require(0.0 < decay <= 1.0, "optim.layer_decay", "must lie in (0, 1] (1: no decay)")


def check_model_unchanged(
    config: ml_collections.ConfigDict, run: ml_collections.ConfigDict, source: str, run_json: str
) -> None:
    """Refuses a ``config.model`` that differs from the run's (the encoder in ``source``), but
    for ``dtype``: fine-tuning may compute in another precision than pre-training did."""
    saved, now = ckpt_lib.run_identity(run)["model"], ckpt_lib.run_identity(config)["model"]
    for key in sorted(set(saved) | set(now)):
        if saved.get(key, "<unset>") != now.get(key, "<unset>"):
            hint = (" (stochastic depth for fine-tuning is --config.drop_path_rate)"
                    if key == "drop_path_rate" else "")
            raise ConfigError(
                f"config.model.{key}={now.get(key, '<unset>')!r} does not match the encoder of "
                f"{source}, which has model.{key}={saved.get(key, '<unset>')!r} (from {run_json}):"
                f" fine-tuning starts from the encoder as it was pre-trained, so drop that "
                f"override{hint}")


def _checkpoint_path(workdir: epath.Path, step: int) -> tuple[int, str]:
    """``(step, path)`` of the checkpoint to restore (the latest for -1), before restoring."""
    steps = ckpt_lib.checkpoint_steps(workdir / "checkpoints")
    if not steps:
        raise ckpt_lib.WorkdirError(
            f"no checkpoint in {workdir / 'checkpoints'}: train first, or fine-tune a random "
            "init with --config.from_scratch=True")
    if step >= 0 and step not in steps:
        raise ckpt_lib.WorkdirError(
            f"no checkpoint of step {step} in {workdir / 'checkpoints'}; available steps: "
            f"{steps} (or --config.step=-1 for the latest)")
    step = step if step >= 0 else steps[-1]
    return step, str(workdir / "checkpoints" / str(step))


def _check_restored(abstract: Any, restored: dict[str, Any], source: str) -> None:
    """The restored encoder variables must have the fine-tuning encoder's structure and shapes."""
    for collection, tree in restored.items():
        expected = abstract.get(collection, {}).get("encoder")
        want = {jax.tree_util.keystr(p, simple=True, separator="/"): tuple(x.shape)
                for p, x in jax.tree_util.tree_leaves_with_path(expected or {})}
        got = {jax.tree_util.keystr(p, simple=True, separator="/"): tuple(x.shape)
               for p, x in jax.tree_util.tree_leaves_with_path(tree)}
        for name in sorted(set(want) | set(got)):
            if want.get(name) != got.get(name):
                raise ckpt_lib.WorkdirError(
                    f"encoder variable {collection}/{name} has shape {got.get(name, 'missing')} in"
                    f" {source} but {want.get(name, 'missing')} in the fine-tuning model built "
                    "from the run's config.json: the checkpoint does not belong to that config")


def result_name(config: ml_collections.ConfigDict, step: int | None) -> str:
    init = "from_scratch" if config.from_scratch else f"pretrained@step{step}"
    name = f"{init},label_fraction={float(config.label_fraction)}"
    return name + (f",seed={config.seed}" if config.seed else "")


def finetune_dir(workdir: epath.PathLike, name: str) -> epath.Path:
    """``RUN/finetune/<name>``, the fine-tuning's own run (``name`` of :func:`result_name` with
    every character but letters, digits, ``.``, ``-`` and ``_`` replaced by ``_``)."""
    return ckpt_lib.workdir_path(workdir) / FINETUNE_DIR / re.sub(r"[^A-Za-z0-9._-]", "_", name)


def _identity(config: ml_collections.ConfigDict) -> dict[str, Any]:
    return {**ckpt_lib.run_identity(config), **{k: config.get(k) for k in FINETUNE_IDENTITY_KEYS}}


def check_finetune_dir(directory: epath.Path, config: ml_collections.ConfigDict) -> bool:
    """Refuses a fine-tuning folder whose saved config has another method, model or pool (its
    checkpoints are not this fine-tuning's); returns whether the folder holds checkpoints."""
    saved_path = directory / "config.json"
    checkpoints = directory / "checkpoints"
    has_checkpoints = checkpoints.exists() and any(
        p.name.isdigit() for p in checkpoints.iterdir())
    if saved_path.exists():
        saved, now = _identity(config_lib.from_json(saved_path.read_text())), _identity(config)
        for key in sorted(saved):
            if saved[key] != now[key]:
                raise ckpt_lib.WorkdirError(
                    f"{directory} holds a fine-tuning with {key}={_short(saved[key])}, but this "
                    f"one has {key}={_short(now[key])} (saved config: {saved_path}); its "
                    "checkpoints cannot be resumed. Move that folder away to fine-tune afresh.")
        if config_lib.to_json(config_lib.from_json(saved_path.read_text())) != (
                config_lib.to_json(config)):
            logging.warning("resuming %s with a config that differs from %s", directory,
                            saved_path)
    elif has_checkpoints:
        raise ckpt_lib.WorkdirError(
            f"{directory} holds checkpoints but no config.json, so they cannot be checked "
            "against this fine-tuning; move that folder away to fine-tune afresh.")
    return has_checkpoints


def _short(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str) if isinstance(value, dict) else repr(
        value)


def _record_config(directory: epath.Path, config: ml_collections.ConfigDict) -> None:
    if jax.process_index() == 0 and not (directory / "config.json").exists():
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / "config.json.tmp"
        tmp.write_text(config_lib.to_json(config))
        tmp.replace(directory / "config.json")


def _loss_curve(directory: epath.Path, last_step: int) -> list[list[float]]:
    """``[[step, loss], ...]`` of every logged step up to ``last_step`` in ``metrics.jsonl`` (all
    invocations; a step logged again after a resume keeps its latest value)."""
    path = directory / "metrics.jsonl"
    rows = {}
    for line in path.read_text().splitlines() if path.exists() else ():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
        if "loss" in row and row["step"] <= last_step:
            rows[row["step"]] = row["loss"]
    return [[step, rows[step]] for step in sorted(rows)]


# --- The job --------------------------------------------------------------------------------


def finetune(
    workdir: str, config_arg: str | None = None, overrides: list[str] = ()
) -> dict[str, Any]:
    """Fine-tunes (or trains from scratch) per the config, resuming from the fine-tuning's own
    newest checkpoint; returns this run's result entry. Raises
    :class:`~ssl_jax.faults.Preempted` after saving for a preemption notice (SIGTERM) and
    :class:`~ssl_jax.faults.NonFiniteError` (``on_nonfinite='stop'``)."""
    with faults.PreemptionWatcher() as preemption:
        return _finetune(workdir, config_arg, overrides, preemption)


def _finetune(workdir, config_arg, overrides, preemption: faults.PreemptionWatcher):
    start = time.perf_counter()
    workdir = ckpt_lib.workdir_path(workdir)
    config, run = load_config(workdir, config_arg, list(overrides))
    mesh = parallel.make_mesh(config.mesh.fsdp)
    check_config(config, mesh)
    run_json = str(workdir / "config.json")
    step, source = None, run_json
    if not config.from_scratch:
        step, source = _checkpoint_path(workdir, config.step)
    check_model_unchanged(config, run, source, run_json)

    # --- Model ------------------------------------------------------------------------------
    method = methods.create(run, mesh)
    encoder = method.encoder.clone(dtype=methods.model_dtype(config))
    trained_size = classifier_lib.encoder_image_size(encoder)
    if trained_size and config.image_size not in (0, trained_size):
        raise ConfigError(
            f"config.image_size={config.image_size} does not match the encoder of {source}: its "
            f"position embeddings are for {trained_size}x{trained_size} inputs (aug.view1.size "
            f"in {run_json}); use image_size=0 or {trained_size}")
    crop = config.image_size or trained_size or run.aug.view1.size
    try:
        classifier_lib.check_pool(encoder, config.pool)
    except ValueError as e:
        raise ConfigError(f"config.pool: {e}") from None
    try:  # Random resized crop + flip; no colour augmentation.
        view = augment.view_config(
            size=crop, crop_scale=tuple(config.aug.crop_scale),
            crop_ratio=tuple(config.aug.crop_ratio), flip=config.aug.flip, color_jitter=0.0,
            grayscale_p=0.0, blur_p=0.0)
    except ValueError as e:
        raise ConfigError(f"config.aug: {e}") from None
    encoder, drop_path = classifier_lib.with_drop_path(encoder, config.drop_path_rate)
    if config.drop_path_rate and not drop_path:
        logging.info("drop_path_rate=%g is not used: a %s has no stochastic depth",
                     config.drop_path_rate, type(encoder).__name__)

    # --- Data -------------------------------------------------------------------------------
    num_classes = pipeline.num_classes(config.data)
    indices = finetune_data.labelled_indices(config.data, config.label_fraction, config.seed)
    num_train = (len(indices) if indices is not None
                 else pipeline.num_examples(config.data, config.data.train_split))
    require(config.batch_size <= num_train, "batch_size",
            f"{config.batch_size} exceeds the {num_train} labelled training examples "
            f"(label_fraction={config.label_fraction}); use a smaller batch")
    steps_per_epoch = max(num_train // config.batch_size, 1)
    total_steps = config.total_steps or max(int(round(config.num_epochs * steps_per_epoch)), 1)

    # --- Optimizer, state -------------------------------------------------------------------
    model = classifier_lib.Classifier(encoder, num_classes, config.pool)
    schedule = optim.learning_rate_schedule(config.optim, config.batch_size, total_steps,
                                            steps_per_epoch)
    tx = optim.make_optimizer(config.optim, schedule, steps_per_epoch, total_steps)
    decay = config.optim.get("layer_decay", 1.0)
    if decay < 1.0:
        layer_id, num_layers = classifier_lib.layer_ids(encoder)
        tx = optax.chain(tx, optim.scale_by_layer_decay(decay, layer_id, num_layers))
    example = method.encoder_input(jnp.zeros((mesh.size, crop, crop, 3), jnp.float32))

    def init_state(rng, encoder_vars):
        variables = model.init({"params": rng, "dropout": rng}, example, train=False)
        params, stats = dict(variables["params"]), dict(variables.get("batch_stats", {}))
        if encoder_vars is not None:
            params["encoder"] = encoder_vars["params"]
            if "batch_stats" in encoder_vars:
                stats["encoder"] = encoder_vars["batch_stats"]
        return {"step": jnp.zeros((), jnp.int32), "params": params, "batch_stats": stats,
                "opt_state": tx.init(params), "nonfinite_steps": jnp.zeros((), jnp.int32)}

    init_rng, step_rng = jax.random.split(jax.random.key(config.seed))
    name = result_name(config, step)
    directory = finetune_dir(workdir, name)
    resuming = check_finetune_dir(directory, config)
    encoder_vars = None
    if not config.from_scratch and not resuming:  # a resumed state holds the encoder already
        abstract = jax.eval_shape(lambda r: model.init({"params": r, "dropout": r}, example,
                                                       train=False), jax.random.key(0))
        try:
            _, encoder_vars, _ = restore_encoder(workdir, run, mesh, step)
        except ckpt_lib.WorkdirError:
            raise
        except Exception as e:  # noqa: BLE001 - an unreadable checkpoint is the user's input.
            raise ckpt_lib.WorkdirError(
                f"checkpoint {source} does not restore into the encoder of {run_json}: "
                f"{type(e).__name__}: {str(e)[:300]}") from None
        encoder_vars = classifier_lib.without_unused(encoder, config.pool, dict(encoder_vars))
        _check_restored(abstract, encoder_vars, source)
        logging.info("fine-tuning the %s encoder of %s", run.method, source)
    abstract = jax.eval_shape(init_state, init_rng, encoder_vars)
    shardings = parallel.tree_shardings(abstract, mesh, config.sharding_rules)
    abstract = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)

    # --- Checkpoints: only now that everything accepts the config is anything written ---------
    _record_config(directory, config)
    data_iter = iter(finetune_data.labelled_train_loader(
        config.data, indices, global_batch_size=config.batch_size, seed=config.seed,
        process_index=jax.process_index(), process_count=jax.process_count()))
    checkpoints = ckpt_lib.RunCheckpoints(
        directory, keep=config.checkpoint.keep, keep_every=config.checkpoint.keep_every,
        async_save=config.checkpoint.async_save)
    start_step, state = checkpoints.restore_latest_good(abstract, data_iter)
    if state is None:
        state = jax.jit(init_state, out_shardings=shardings)(init_rng, encoder_vars)
        start_step = 0
        logging.info("started fine-tuning %s in %s", name, directory)
    else:
        logging.info("resumed %s from step %d", directory, start_step)
    del encoder_vars
    logging.info("%d parameters, %d labelled examples of %d classes, %d steps (%d per epoch)",
                 sum(x.size for x in jax.tree_util.tree_leaves(state["params"])), num_train,
                 num_classes, total_steps, steps_per_epoch)

    # --- Train (the pre-training loop: ssl_jax.loop) ------------------------------------------
    step_fn = flops.CountedStep(jax.jit(
        make_train_step(model, tx, schedule, step_rng, view, config, num_classes,
                        method.encoder_input),
        in_shardings=(shardings, parallel.batch_sharding(mesh)),
        out_shardings=(shardings, parallel.replicated(mesh)), donate_argnums=(0,)))
    train_start = time.perf_counter()
    state = loop.run_steps(
        state=state, step_fn=step_fn, data_iter=data_iter, to_batch=_images_and_labels,
        mesh=mesh, checkpoints=checkpoints, writer=MetricsWriter(directory),
        preemption=preemption, start_step=start_step, last_step=total_steps,
        total_steps=total_steps, steps_per_epoch=steps_per_epoch, batch_size=config.batch_size,
        log_every=config.log_every, checkpoint_every=config.checkpoint.every_steps,
        on_nonfinite=config.on_nonfinite,
        peak_flops=flops.peak_flops(config.model.get("dtype", "float32")), log_lines=True)
    checkpoints.close()
    train_s = time.perf_counter() - train_start  # compilation included
    final_step = int(state["step"])
    if final_step != total_steps:
        logging.warning("the fine-tuning in %s is at step %d, not %d (total_steps changed?); "
                        "evaluating it as it is", directory, final_step, total_steps)

    # --- Evaluate, write ----------------------------------------------------------------------
    top1, num_test = evaluate_top1(model, state, config, crop, mesh, method.encoder_input)
    entry = {
        "init": "from_scratch" if config.from_scratch else "pretrained",
        "checkpoint_step": step, "method": run.method, "model": config.model.name,
        "data": config.data.name, "label_fraction": float(config.label_fraction),
        "seed": config.seed, "test_top1": top1, "num_labelled": int(num_train),
        "num_test": num_test, "num_classes": num_classes, "steps": final_step,
        "epochs": final_step / steps_per_epoch, "batch_size": config.batch_size,
        "image_size": crop, "train_loss_curve": _loss_curve(directory, final_step),
        "train_seconds": train_s, "seconds": time.perf_counter() - start,
        "nonfinite_steps": int(state["nonfinite_steps"]), "directory": str(directory),
        "config": json.loads(config_lib.to_json(config)),
    }
    if parallel.is_main_process():
        results = metrics_lib.update_results(workdir / RESULTS_FILE, {name: entry})
        print(format_table(results, name))
    return entry


def _images_and_labels(batch: dict[str, Any]) -> dict[str, Any]:
    keep = ("image", "label", "image_hw")  # image_hw: data.train_region='whole'
    return {name: batch[name] for name in keep if name in batch}


# --- Results --------------------------------------------------------------------------------


def format_table(results: dict[str, Any], latest: str) -> str:
    """Every fine-tuning result of the run, ``latest`` (this job's) marked with ``*``."""
    rows = [("fine-tuning", "labelled", "steps", "test top-1")]
    for name, r in results.items():
        if not isinstance(r, dict) or "test_top1" not in r:
            continue
        rows.append((name + (" *" if name == latest else ""), str(r["num_labelled"]),
                     str(r["steps"]), f"{100 * r['test_top1']:.2f}%"))
    width = max(len(r[0]) for r in rows)
    first = results[latest]
    lines = [f"{first['method']} {first['model']} on {first['data']} "
             f"(test {first['num_test']}; * this run)"]
    lines += [f"  {a:<{width}}  {b:>8}  {c:>6}  {d:>10}" for a, b, c, d in rows]
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    from ssl_jax import cli

    workdir = cli.workdir_argument(argv)
    parallel.initialize_distributed()
    finetune(workdir, flags.FLAGS.config, _OVERRIDES)


def define_flags() -> None:
    """The command line of ``python -m ssl_jax.finetune`` (defined only when run as a program)."""
    flags.DEFINE_string("workdir", None, "Directory of the pre-training run to fine-tune.")
    flags.DEFINE_string("config", None, "Fine-tuning config and presets, e.g. "
                        "configs/finetune.py:data=digits (default: the recipe of the run's "
                        "dataset, ssl_jax/finetuning/default_config.py).")


def run_command(main_fn=None) -> None:
    """``python -m ssl_jax.finetune``: flags, ``--config.KEY=VALUE`` overrides, exit codes
    (``main_fn``: another ``main``, e.g. one that injects a fault first, for tests)."""
    from ssl_jax import cli

    define_flags()
    sys.argv, _OVERRIDES[:] = config_lib.split_config_overrides(sys.argv)
    cli.run(main_fn or main)


if __name__ == "__main__":
    run_command()
