r"""The evaluation job: linear probe and weighted kNN on a run's frozen encoder.

    python -m ssl_jax.evaluate --workdir DIR [--config.eval.step=500] [--config.KEY=VALUE ...]

It reads the run's ``DIR/config.json``, applies the overrides (e.g. ``--config.data.root=...``
when the data moved, ``--config.eval.knn_k=10``; an override of ``method`` or ``model.*``, or one
that changes the shapes of the saved state, e.g. a ViT's ``aug.view1.size``, is refused naming
the key, as are bad ``eval.*`` values, before anything is restored), restores the chosen
checkpoint, extracts features of the train and test splits without augmentation, and runs (a) a
linear probe whose learning rate and weight decay are chosen on a held-out part of the TRAIN
split, reporting test top-1, and (b) weighted kNN (k=20, T=0.07, as in DINO). It does the same
for a randomly initialised encoder of the same architecture, prints both side by side, and
writes ``DIR/eval.json`` (kept per step: earlier results are never overwritten). When the
encoder is a ViT it also writes ``DIR/attention_step{N}.png``: the last block's cls-token
attention of every head for a few test images (``ssl_jax.evaluate.pictures``). A visual tokenizer
(the dVAE) also gets its hard-code reconstruction error and code usage on the test split and
``DIR/token_usage_step{N}.png`` (``ssl_jax.evaluate.tokenizer``).
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import jax
import ml_collections
from absl import flags, logging

from ssl_jax import checkpoint as ckpt_lib
from ssl_jax import config as config_lib
from ssl_jax import methods, metrics, parallel
from ssl_jax.config import ConfigError, require
from ssl_jax.data import pipeline
from ssl_jax.evaluate import features as features_lib
from ssl_jax.evaluate.knn import knn_top1
from ssl_jax.evaluate.linear_probe import NORMALIZE_MODES, linear_probe
from ssl_jax.evaluate.pictures import write_attention_pictures, write_method_pictures
from ssl_jax.evaluate.protocols import PROTOCOLS, train_protocol_probe
from ssl_jax.evaluate.tokenizer import evaluate_tokenizer
from ssl_jax.models.vit import ViT
from ssl_jax.step import build_state

_OVERRIDES: list[str] = []
# Override prefixes that leave the checkpointed state's shapes alone: evaluation settings, where
# the data lies and its splits, the seed, the device layout.
_STATE_NEUTRAL = ("eval.", "data.", "seed=", "mesh.", "sharding_rules=")


def evaluate_encoder(method, variables, config, mesh, seed: int) -> dict[str, Any]:
    """Linear-probe and kNN top-1 of ``method``'s encoder on the run's train/test splits (the
    encoder sees ``method.encoder_input`` of the images)."""
    ev = config.eval
    start = time.perf_counter()
    train_x, train_y = features_lib.extract_features(
        method.encoder, variables, config, config.data.train_split, mesh, method.encoder_input)
    test_x, test_y = features_lib.extract_features(
        method.encoder, variables, config, config.data.test_split, mesh, method.encoder_input)
    train_x, train_y = features_lib.subsample(train_x, train_y, ev.max_train_examples, seed)
    test_x, test_y = features_lib.subsample(test_x, test_y, ev.max_test_examples, seed + 1)
    extract_s = time.perf_counter() - start
    num_classes = pipeline.num_classes(config.data)
    probe = linear_probe(
        train_x, train_y, test_x, test_y, num_classes, val_fraction=ev.probe_val_fraction,
        epochs=ev.probe_epochs, seed=seed, normalize=ev.probe_normalize,
        label_fraction=ev.label_fraction)
    knn = knn_top1(train_x, train_y, test_x, test_y, num_classes, k=ev.knn_k,
                   temperature=ev.knn_temperature)
    protocol = (train_protocol_probe(method, variables, config, mesh)
                if ev.get("protocol", "fast") != "fast" else None)
    return {
        **({"protocol": protocol} if protocol else {}),
        "linear_top1": probe["test_top1"],
        "linear_val_top1": probe["val_top1"],
        "linear_best_lr": probe["best_learning_rate"],
        "linear_best_wd": probe["best_weight_decay"],
        "knn_top1": knn,
        "num_train": int(len(train_y)),
        "num_test": int(len(test_y)),
        "feature_dim": int(train_x.shape[1]),
        "seconds": time.perf_counter() - start,
        "extract_seconds": extract_s,
    }


def check_eval_config(config: ml_collections.ConfigDict, mesh: Any) -> None:
    """The ``eval`` keys, before anything is restored or read."""
    ev = config.eval
    require(ev.step >= -1, "eval.step", "must be a checkpoint step, or -1 for the latest")
    require(ev.batch_size > 0 and ev.batch_size % mesh.size == 0, "eval.batch_size",
            f"must be a positive multiple of the device count {mesh.size}")
    require(ev.knn_k >= 1, "eval.knn_k", "must be >= 1")
    require(ev.knn_temperature > 0, "eval.knn_temperature", "must be > 0")
    require(ev.probe_normalize in NORMALIZE_MODES, "eval.probe_normalize",
            f"must be one of {', '.join(NORMALIZE_MODES)}")
    require(ev.probe_epochs >= 1, "eval.probe_epochs", "must be >= 1")
    require(0.0 <= ev.probe_val_fraction < 1.0, "eval.probe_val_fraction", "must lie in [0, 1)")
    require(0.0 < ev.label_fraction <= 1.0, "eval.label_fraction", "must lie in (0, 1]")
    for key in ("max_train_examples", "max_test_examples", "attention_images", "protocol_epochs",
                "protocol_batch_size", "protocol_base_lr", "n_last_blocks"):
        require(ev.get(key, 0) >= 0, f"eval.{key}", "must be >= 0 (0: none, all or the default)")
    require(ev.get("protocol", "fast") in PROTOCOLS, "eval.protocol",
            f"must be one of {', '.join(PROTOCOLS)} (ssl_jax/evaluate/protocols.py)")


def _state_shapes(config: ml_collections.ConfigDict, mesh: Any) -> dict[str, Any]:
    """``{path: (shape, dtype)}`` of the state a run of ``config`` checkpoints."""
    setup = build_state(config, mesh, methods.create(config, mesh), 1, 1)
    return {jax.tree_util.keystr(path): (tuple(x.shape), str(x.dtype))
            for path, x in jax.tree_util.tree_leaves_with_path(setup.abstract)}


def check_overrides_fit_run(run: ml_collections.ConfigDict, config: ml_collections.ConfigDict,
                            overrides: list[str], mesh: Any, run_json: str) -> None:
    """Refuses overrides that change the architecture the checkpoints were saved with, naming
    the key (rather than letting the restore fail on a shape deep in the checkpoint)."""
    def fields(value: Any) -> dict[str, Any]:
        return value if isinstance(value, dict) else {"": value}

    run_id, now_id = ckpt_lib.run_identity(run), ckpt_lib.run_identity(config)
    for key in ckpt_lib.IDENTITY_KEYS:
        saved, now = fields(run_id[key]), fields(now_id[key])
        for name in sorted(set(saved) | set(now)):
            if saved.get(name, "<unset>") != now.get(name, "<unset>"):
                full = ".".join(filter(None, (key, name)))
                raise ConfigError(
                    f"config.{full}={now.get(name, '<unset>')!r} does not match the run, which "
                    f"has {full}={saved.get(name, '<unset>')!r} (from {run_json}): evaluation "
                    "restores the encoder as it was trained, so drop that override")
    risky = [item for item in overrides if not item.startswith(_STATE_NEUTRAL)]
    if not risky:
        return
    saved = _state_shapes(run, mesh)
    for item in risky:
        trial = config_lib.from_json(config_lib.to_json(run))
        config_lib.apply_overrides(trial, [item])
        shapes = _state_shapes(trial, mesh)
        for path in sorted(set(saved) | set(shapes)):
            if saved.get(path) != shapes.get(path):
                raise ConfigError(
                    f"--config.{item} changes the checkpointed state ({path}: "
                    f"{saved.get(path, 'missing')} in the run of {run_json}, "
                    f"{shapes.get(path, 'missing')} with the override), so no checkpoint "
                    "restores with it: drop that override")


def evaluate(workdir: str, overrides: list[str] = ()) -> dict[str, Any]:
    workdir = ckpt_lib.workdir_path(workdir)
    run = ckpt_lib.load_run_config(workdir)
    config = config_lib.from_json(config_lib.to_json(run))
    config_lib.apply_overrides(config, overrides)
    mesh = parallel.make_mesh(config.mesh.fsdp)
    check_eval_config(config, mesh)
    check_overrides_fit_run(run, config, list(overrides), mesh, str(workdir / "config.json"))
    method, state, step = features_lib.restore_state(workdir, config, mesh, config.eval.step)
    variables = method.encoder_variables(state["params"], state["extra"])
    logging.info("evaluating %s at step %d", workdir, step)
    results = {"step": int(step), "method": config.method, "model": config.model.name,
               "data": config.data.name, "eval_config": config.eval.to_dict()}
    results["ssl"] = evaluate_encoder(method, variables, config, mesh, config.seed)
    if isinstance(method.encoder, ViT):
        picture = write_attention_pictures(method.encoder, variables, config, mesh, workdir, step,
                                           config.eval.attention_images, method.encoder_input)
        if picture:
            results["attention_picture"] = picture
            logging.info("wrote attention maps to %s", picture)
    picture = write_method_pictures(method, state, config, mesh, workdir, step,
                                    config.eval.attention_images)
    if picture:
        results["reconstruction_picture"] = picture
        logging.info("wrote reconstructions to %s", picture)
    tokens = evaluate_tokenizer(method, state["params"], config, mesh, workdir, step)
    if tokens:
        results["tokenizer"] = tokens
        logging.info("wrote token usage to %s", tokens["token_usage_picture"])
    if config.eval.random_init_baseline:
        rnd_method, rnd_vars = features_lib.random_encoder(config, mesh, config.seed + 1)
        results["random_init"] = evaluate_encoder(
            rnd_method, rnd_vars, config, mesh, config.seed)
    if parallel.is_main_process():
        print(format_table(results), flush=True)
        try:
            metrics.update_results(workdir / "eval.json",
                                   {f"step_{results['step']}": results, "latest": results})
        except OSError:  # the job's work is not lost with the file: it goes to the log
            logging.error("could not write %s; this evaluation's results:\n%s",
                          workdir / "eval.json", json.dumps(results, indent=2, default=str))
            raise
    return results


def format_table(results: dict[str, Any]) -> str:
    protocol = results["ssl"].get("protocol", {}).get("protocol")
    rows = [("encoder", "linear top-1", "kNN top-1") + ((f"{protocol} protocol",) if protocol
                                                         else ())]
    for key, label in (("ssl", f"{results['method']} step {results['step']}"),
                       ("random_init", "random init")):
        if key in results:
            r = results[key]
            rows.append((label, f"{100 * r['linear_top1']:.2f}%", f"{100 * r['knn_top1']:.2f}%")
                        + ((f"{100 * r['protocol']['top1']:.2f}%",) if protocol else ()))
    width = max(len(r[0]) for r in rows)
    lines = [f"{results['model']} on {results['data']} "
             f"(train {results['ssl']['num_train']}, test {results['ssl']['num_test']})"]
    lines += ["  " + f"{r[0]:<{width}}  {r[1]:>12}  {r[2]:>10}"
              + (f"  {r[3]:>14}" if len(r) > 3 else "") for r in rows]
    if "tokenizer" in results:
        t = results["tokenizer"]
        lines.append(f"  tokenizer: hard-code reconstruction MSE {t['hard_recon_mse']:.4f}, "
                     f"{t['tokens_used']} of {t['vocab_size']} tokens used, perplexity "
                     f"{t['code_perplexity']:.1f} (test {t['num_test']})")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    from ssl_jax import cli

    workdir = cli.workdir_argument(argv)
    parallel.initialize_distributed()
    evaluate(workdir, _OVERRIDES)


if __name__ == "__main__":
    from ssl_jax import cli

    flags.DEFINE_string("workdir", None, "Directory of the training run to evaluate.")
    sys.argv, _OVERRIDES[:] = config_lib.split_config_overrides(sys.argv)
    cli.run(main)
