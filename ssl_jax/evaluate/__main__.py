r"""The evaluation job: linear probe and weighted kNN on a run's frozen encoder.

    python -m ssl_jax.evaluate --workdir DIR [--config.eval.step=500] [--config.KEY=VALUE ...]

It reads the run's ``DIR/config.json``, applies the overrides (e.g. ``--config.data.root=...``
when the data moved, ``--config.eval.knn_k=10``), restores the chosen checkpoint, extracts
features of the train and test splits without augmentation, and runs (a) a linear probe whose
learning rate and weight decay are chosen on a held-out part of the TRAIN split, reporting test
top-1, and (b) weighted kNN (k=20, T=0.07, as in DINO). It does the same for a randomly
initialised encoder of the same architecture, prints both side by side, and writes
``DIR/eval.json`` (kept per step: earlier results are never overwritten). When the encoder is a
ViT it also writes ``DIR/attention_step{N}.png``: the last block's cls-token attention of every
head for a few test images (``ssl_jax.evaluate.pictures``). A visual tokenizer (the dVAE) also
gets its hard-code reconstruction error and code usage on the test split and
``DIR/token_usage_step{N}.png`` (``ssl_jax.evaluate.tokenizer``).
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from absl import flags, logging
from etils import epath

from ssl_jax import checkpoint as ckpt_lib
from ssl_jax import config as config_lib
from ssl_jax import parallel
from ssl_jax.data import pipeline
from ssl_jax.evaluate import features as features_lib
from ssl_jax.evaluate.knn import knn_top1
from ssl_jax.evaluate.linear_probe import linear_probe
from ssl_jax.evaluate.pictures import write_attention_pictures, write_method_pictures
from ssl_jax.evaluate.tokenizer import evaluate_tokenizer
from ssl_jax.models.vit import ViT

_OVERRIDES: list[str] = []


def evaluate_encoder(encoder, variables, config, mesh, seed: int) -> dict[str, Any]:
    """Linear-probe and kNN top-1 of one encoder on the run's train/test splits."""
    ev = config.eval
    start = time.perf_counter()
    train_x, train_y = features_lib.extract_features(
        encoder, variables, config, config.data.train_split, mesh)
    test_x, test_y = features_lib.extract_features(
        encoder, variables, config, config.data.test_split, mesh)
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
    return {
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


def evaluate(workdir: str, overrides: list[str] = ()) -> dict[str, Any]:
    workdir = ckpt_lib.workdir_path(workdir)
    config = ckpt_lib.load_run_config(workdir)
    config_lib.apply_overrides(config, overrides)
    mesh = parallel.make_mesh(config.mesh.fsdp)
    method, state, step = features_lib.restore_state(workdir, config, mesh, config.eval.step)
    variables = method.encoder_variables(state["params"], state["extra"])
    logging.info("evaluating %s at step %d", workdir, step)
    results = {"step": int(step), "method": config.method, "model": config.model.name,
               "data": config.data.name, "eval_config": config.eval.to_dict()}
    results["ssl"] = evaluate_encoder(method.encoder, variables, config, mesh, config.seed)
    if isinstance(method.encoder, ViT):
        picture = write_attention_pictures(method.encoder, variables, config, mesh, workdir, step,
                                           config.eval.get("attention_images", 4))
        if picture:
            results["attention_picture"] = picture
            logging.info("wrote attention maps to %s", picture)
    picture = write_method_pictures(method, state, config, mesh, workdir, step,
                                    config.eval.get("attention_images", 4))
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
            rnd_method.encoder, rnd_vars, config, mesh, config.seed)
    if parallel.is_main_process():
        _write_results(workdir / "eval.json", results)
        print(format_table(results))
    return results


def _write_results(path: epath.Path, results: dict[str, Any]) -> None:
    """``eval.json`` maps ``"step_N"`` to that step's results; other steps are kept."""
    existing = {}
    if path.exists():
        try:
            existing = json.loads(path.read_text())
        except json.JSONDecodeError:
            backup = path.with_suffix(f".unreadable-{int(time.time())}.json")
            path.rename(backup)
            logging.warning("%s was not valid JSON; kept it as %s", path, backup)
    existing[f"step_{results['step']}"] = results
    existing["latest"] = results
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(existing, indent=2))
    tmp.replace(path)


def format_table(results: dict[str, Any]) -> str:
    rows = [("encoder", "linear top-1", "kNN top-1")]
    for key, label in (("ssl", f"{results['method']} step {results['step']}"),
                       ("random_init", "random init")):
        if key in results:
            r = results[key]
            rows.append((label, f"{100 * r['linear_top1']:.2f}%", f"{100 * r['knn_top1']:.2f}%"))
    width = max(len(r[0]) for r in rows)
    lines = [f"{results['model']} on {results['data']} "
             f"(train {results['ssl']['num_train']}, test {results['ssl']['num_test']})"]
    lines += [f"  {a:<{width}}  {b:>12}  {c:>10}" for a, b, c in rows]
    if "tokenizer" in results:
        t = results["tokenizer"]
        lines.append(f"  tokenizer: hard-code reconstruction MSE {t['hard_recon_mse']:.4f}, "
                     f"{t['tokens_used']} of {t['vocab_size']} tokens used, perplexity "
                     f"{t['code_perplexity']:.1f} (test {t['num_test']})")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise flags.Error(f"unexpected arguments: {argv[1:]}")
    if flags.FLAGS.workdir is None:
        raise flags.Error("--workdir is required")
    parallel.initialize_distributed()
    evaluate(flags.FLAGS.workdir, _OVERRIDES)


if __name__ == "__main__":
    from ssl_jax import cli

    flags.DEFINE_string("workdir", None, "Directory of the training run to evaluate.")
    sys.argv, _OVERRIDES[:] = config_lib.split_config_overrides(sys.argv)
    cli.run(main)
