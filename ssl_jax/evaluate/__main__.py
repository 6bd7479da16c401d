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

More views of the same features (``ssl_jax.evaluate.clustering``): k-means on the test features
(``eval.kmeans``, k = the classes or ``eval.kmeans_k``) scored by NMI, ARI and cluster accuracy,
and ``DIR/tsne_step{N}.png``, a t-SNE map of ``eval.tsne_points`` test features coloured by class,
one panel per encoder (0 points: none). ``--config.eval.export_features=PATH.npz`` saves the
run's encoder's features and labels of the whole train and test splits (an existing file is
refused unless ``--config.eval.export_overwrite=true``). ``--config.eval.data=NAME`` evaluates
the encoder on another dataset than it was trained on (transfer; ``eval.data_root`` for an
image folder): every view then reads that dataset, the results go to ``eval.json`` under
``step_{N}_{NAME}`` and the pictures are named ``..._{NAME}_step{N}.png``.
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
from ssl_jax.evaluate import clustering, frozen
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


def evaluate_encoder(method, variables, config, mesh, seed: int,
                     export: str = "") -> dict[str, Any]:
    """Linear-probe and kNN top-1, k-means scores and the t-SNE map (key ``tsne``, popped by
    :func:`evaluate`) of ``method``'s encoder on ``config.data``'s train/test splits (the encoder
    sees ``method.encoder_input`` of the images). ``export``: a ``.npz`` path where the whole
    splits' features and labels are saved first."""
    ev = config.eval
    start = time.perf_counter()
    train_x, train_y = features_lib.extract_features(
        method.encoder, variables, config, config.data.train_split, mesh, method.encoder_input)
    test_x, test_y = features_lib.extract_features(
        method.encoder, variables, config, config.data.test_split, mesh, method.encoder_input)
    if export and parallel.is_main_process():
        frozen.save_features(export, {
            "train_features": train_x, "train_labels": train_y, "test_features": test_x,
            "test_labels": test_y, "method": config.method, "model": config.model.name,
            "data": config.data.name}, overwrite=ev.export_overwrite)
        logging.info("wrote the features to %s", export)
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
    views: dict[str, Any] = {}
    if ev.kmeans:
        views["kmeans"] = clustering.kmeans_scores(test_x, test_y, ev.kmeans_k or num_classes,
                                                   seed, ev.kmeans_n_init)
    if ev.tsne_points:
        x, y = features_lib.subsample(test_x, test_y, ev.tsne_points, seed + 2)
        views["tsne"] = (clustering.tsne_points(x, ev.tsne_perplexity, seed), y)
    return {
        **({"protocol": protocol} if protocol else {}),
        "linear_top1": probe["test_top1"],
        "linear_val_top1": probe["val_top1"],
        "linear_best_lr": probe["best_learning_rate"],
        "linear_best_wd": probe["best_weight_decay"],
        "knn_top1": knn,
        **views,
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
    require(ev.kmeans_k >= 0, "eval.kmeans_k", "must be >= 0 (0: the number of classes)")
    require(ev.kmeans_n_init >= 1, "eval.kmeans_n_init", "must be >= 1")
    require(ev.tsne_points >= 0, "eval.tsne_points", "must be >= 0 (0: no t-SNE picture)")
    require(ev.tsne_perplexity > 0, "eval.tsne_perplexity", "must be > 0")


def check_eval_data(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The data the encoder is evaluated on (the run's, or ``eval.data``'s for transfer), with
    the views' sizes checked against its test split: k-means' k and t-SNE's perplexity must fit
    the test examples evaluated. Reads only the data's listing."""
    ev = config.eval
    data = (frozen.transfer_data_config(config, ev.data, ev.data_root) if ev.data
            else config.data)
    num_test = pipeline.num_examples(data, data.test_split)
    if ev.max_test_examples:
        num_test = min(num_test, ev.max_test_examples)
    if ev.kmeans:
        k = ev.kmeans_k or pipeline.num_classes(data)
        require(k <= num_test, "eval.kmeans_k",
                f"k-means with {k} clusters{'' if ev.kmeans_k else ' (the classes)'} needs at "
                f"least {k} test examples, and {num_test} are evaluated: lower eval.kmeans_k "
                "or raise eval.max_test_examples (or --config.eval.kmeans=false)")
    if ev.tsne_points:
        points = min(ev.tsne_points, num_test)
        require(ev.tsne_perplexity < points, "eval.tsne_perplexity",
                f"must be below the {points} points of the t-SNE picture (eval.tsne_points, "
                "the test examples): lower it or raise eval.tsne_points")
    return data


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
    data = check_eval_data(config)
    export = (str(frozen.check_export_target(config.eval.export_features,
                                             config.eval.export_overwrite))
              if config.eval.export_features else "")
    method, state, step = features_lib.restore_state(workdir, config, mesh, config.eval.step)
    variables = method.encoder_variables(state["params"], state["extra"])
    trained_on = config.data.name
    if config.eval.data:  # transfer: every view below reads the other dataset
        config = frozen.with_data(config, data)
    logging.info("evaluating %s at step %d on %s", workdir, step, config.data.name)
    results = {"step": int(step), "method": config.method, "model": config.model.name,
               "data": config.data.name, "trained_on": trained_on,
               "eval_config": config.eval.to_dict()}
    results["ssl"] = evaluate_encoder(method, variables, config, mesh, config.seed, export)
    if export:
        results["features_file"] = export
    if not config.eval.data:  # the run's own pictures, of its own data
        results.update(write_run_pictures(method, state, variables, config, mesh, workdir, step))
    if config.eval.random_init_baseline:
        rnd_method, rnd_vars = features_lib.random_encoder(config, mesh, config.seed + 1)
        results["random_init"] = evaluate_encoder(
            rnd_method, rnd_vars, config, mesh, config.seed)
    picture = write_tsne(results, workdir)
    if picture:
        results["tsne_picture"] = picture
        logging.info("wrote the t-SNE map to %s", picture)
    if parallel.is_main_process():
        print(format_table(results), flush=True)
        try:
            transfer = "" if results["data"] == trained_on else f"_{results['data']}"
            metrics.update_results(workdir / "eval.json",
                                   {f"step_{results['step']}{transfer}": results,
                                    f"latest{transfer}": results})
        except OSError:  # the job's work is not lost with the file: it goes to the log
            logging.error("could not write %s; this evaluation's results:\n%s",
                          workdir / "eval.json", json.dumps(results, indent=2, default=str))
            raise
    return results


def write_run_pictures(method, state, variables, config, mesh, workdir, step: int
                       ) -> dict[str, Any]:
    """The attention maps of a ViT, the method's own pictures and a tokenizer's evaluation:
    what each wrote, by results key."""
    out: dict[str, Any] = {}
    if isinstance(method.encoder, ViT):
        picture = write_attention_pictures(method.encoder, variables, config, mesh, workdir, step,
                                           config.eval.attention_images, method.encoder_input)
        if picture:
            out["attention_picture"] = picture
            logging.info("wrote attention maps to %s", picture)
    picture = write_method_pictures(method, state, config, mesh, workdir, step,
                                    config.eval.attention_images)
    if picture:
        out["reconstruction_picture"] = picture
        logging.info("wrote reconstructions to %s", picture)
    tokens = evaluate_tokenizer(method, state["params"], config, mesh, workdir, step)
    if tokens:
        out["tokenizer"] = tokens
        logging.info("wrote token usage to %s", tokens["token_usage_picture"])
    return out


def write_tsne(results: dict[str, Any], workdir: Any) -> str:
    """``DIR/tsne_step{N}.png`` (``tsne_{data}_step{N}.png`` for a transfer dataset): one
    panel per evaluated encoder; the maps leave ``results`` (only the path stays)."""
    panels = []
    for key, label in (("ssl", f"{results['method']} step {results['step']}"),
                       ("random_init", "random init")):
        if "tsne" in results.get(key, {}):
            points, labels = results[key].pop("tsne")
            panels.append((f"{label} ({results['data']} test)", points, labels))
    if not panels or not parallel.is_main_process():
        return ""
    name = "" if results["data"] == results["trained_on"] else f"_{results['data']}"
    return clustering.write_scatter(panels, workdir / f"tsne{name}_step{results['step']}.png")


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
    transfer = (f", trained on {results['trained_on']}"
                if results.get("trained_on", results["data"]) != results["data"] else "")
    lines = [f"{results['model']} on {results['data']}{transfer} "
             f"(train {results['ssl']['num_train']}, test {results['ssl']['num_test']})"]
    lines += ["  " + f"{r[0]:<{width}}  {r[1]:>12}  {r[2]:>10}"
              + (f"  {r[3]:>14}" if len(r) > 3 else "") for r in rows]
    for key, label in (("ssl", f"{results['method']} step {results['step']}"),
                       ("random_init", "random init")):
        if "kmeans" in results.get(key, {}):
            km = results[key]["kmeans"]
            lines.append(f"  k-means (k={km['k']}, test {km['num_examples']}) {label}: NMI "
                         f"{km['nmi']:.3f}, ARI {km['ari']:.3f}, cluster accuracy "
                         f"{100 * km['cluster_accuracy']:.2f}%")
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
