"""The evaluation's other views: k-means scores against NumPy references, the t-SNE picture,
features export, transfer to another dataset, the Python API from a plain script, bad requests."""

import itertools
import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from ssl_jax import cli
from ssl_jax.config import ConfigError
from ssl_jax.evaluate import __main__ as evaluate_job
from ssl_jax.evaluate import clustering
from ssl_jax.evaluate import features as features_lib
from tests import xla_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["eval.random_init_baseline=False", "eval.probe_epochs=2"]


def test_cluster_accuracy_by_hand():
    # Clusters 1 -> class 0 (2 right), 0 -> class 1 (2 right), 2 -> class 2 (1 right): 5 of 6.
    assert clustering.cluster_accuracy(np.array([0, 0, 1, 1, 2, 2]),
                                       np.array([1, 1, 0, 0, 0, 2])) == pytest.approx(5 / 6)
    # More clusters than classes: the best one-to-one matching leaves cluster 3 unmatched.
    assert clustering.cluster_accuracy(np.array([0, 0, 0, 1, 1, 1]),
                                       np.array([2, 2, 3, 5, 5, 5])) == pytest.approx(5 / 6)


def _nmi_ari_reference(y, c):
    """NMI (arithmetic mean of the entropies) and ARI from the contingency table."""
    table = np.array([[np.sum((c == i) & (y == j)) for j in np.unique(y)] for i in np.unique(c)],
                     np.float64)
    n = table.sum()
    pij, pi, pj = table / n, table.sum(1) / n, table.sum(0) / n
    nz = pij > 0
    mi = np.sum(pij[nz] * np.log(pij[nz] / np.outer(pi, pj)[nz]))
    h = lambda p: -np.sum(p * np.log(p))  # noqa: E731
    nmi = mi / ((h(pi) + h(pj)) / 2)
    comb = lambda x: x * (x - 1) / 2  # noqa: E731
    index, rows, cols = comb(table).sum(), comb(table.sum(1)).sum(), comb(table.sum(0)).sum()
    expected = rows * cols / comb(n)
    ari = (index - expected) / ((rows + cols) / 2 - expected)
    return nmi, ari


def test_kmeans_scores_match_numpy_references():
    """Three tight groups of features in three directions: k-means finds the groups; the labels
    disagree with them on a few points; the scores equal the NumPy references."""
    rng = np.random.default_rng(0)
    groups = np.repeat([0, 1, 2], 10)
    directions = np.eye(8)[:3] * 5.0
    feats = directions[groups] + 0.01 * rng.normal(size=(30, 8))
    labels = groups.copy()
    labels[[0, 1, 11, 25]] = [1, 2, 0, 1]
    scores = clustering.kmeans_scores(feats, labels, k=3, seed=0, n_init=3)
    nmi, ari = _nmi_ari_reference(labels, groups)
    best = max(np.mean(np.array(perm)[groups] == labels)
               for perm in itertools.permutations(range(3)))
    assert scores["nmi"] == pytest.approx(nmi, rel=1e-9)
    assert scores["ari"] == pytest.approx(ari, rel=1e-9)
    assert scores["cluster_accuracy"] == pytest.approx(best) == pytest.approx(26 / 30)
    assert (scores["k"], scores["num_examples"]) == (3, 30)
    with pytest.raises(ValueError, match="k <= 30"):
        clustering.kmeans_scores(feats, labels, k=31, seed=0)


def test_tsne_keeps_separate_groups_apart(tmp_path):
    rng = np.random.default_rng(1)
    labels = np.repeat([0, 1], 20)
    feats = np.where(labels[:, None] == 0, 0.0, 10.0) + rng.normal(size=(40, 16))
    points = clustering.tsne_points(feats, perplexity=5.0, seed=0)
    distances = np.linalg.norm(points[:, None] - points[None], axis=-1)
    np.fill_diagonal(distances, np.inf)
    assert np.all(labels[np.argmin(distances, axis=1)] == labels)  # 2-D neighbour: same group
    path = clustering.write_scatter([("a", points, labels), ("b", points, labels)],
                                    tmp_path / "t.png")
    image = np.asarray(Image.open(path))
    assert image.shape[1] == 2 * (clustering.PANEL + 4)
    for label in (0, 1):
        assert np.all(image == clustering.class_color(label), axis=-1).sum() > 40


def test_job_exports_clusters_and_draws(trained_run, tmp_path, capsys):
    config, workdir = trained_run
    target = tmp_path / "out" / "feats.npz"
    results = evaluate_job.evaluate(str(workdir), [*FAST, f"eval.export_features={target}"])
    saved = np.load(target)
    from ssl_jax import parallel

    mesh = parallel.make_mesh()
    method, variables, _ = features_lib.restore_encoder(workdir, config, mesh)
    test_x, test_y = features_lib.extract_features(method.encoder, variables, config, "test",
                                                   mesh, method.encoder_input)
    np.testing.assert_array_equal(saved["test_features"], test_x)
    np.testing.assert_array_equal(saved["test_labels"], test_y)
    assert saved["train_features"].shape == (1437, test_x.shape[1])  # the whole split
    assert str(saved["method"]) == "simclr" and str(saved["data"]) == "digits"
    km = results["ssl"]["kmeans"]
    assert km["k"] == 10 and km["num_examples"] == 128  # runlocal's test subset
    assert 0.0 <= km["nmi"] <= 1.0 and -1.0 <= km["ari"] <= 1.0
    assert 0.1 <= km["cluster_accuracy"] <= 1.0  # a matching is at least as good as chance
    assert os.path.exists(results["tsne_picture"]) and "tsne" not in results["ssl"]
    latest = json.loads((workdir / "eval.json").read_text())["latest"]
    assert latest["ssl"]["kmeans"] == km and latest["features_file"] == str(target)
    assert "k-means (k=10, test 128)" in capsys.readouterr().out
    # The same target again: refused before anything is restored, the file untouched.
    before = target.read_bytes()
    with pytest.raises(ConfigError, match=r"config\.eval\.export_features=.* exists.*"
                       r"export_overwrite=true"):
        evaluate_job.evaluate(str(workdir), [*FAST, f"eval.export_features={target}"])
    assert target.read_bytes() == before


def _image_folder(root, classes=3, per_split=6):
    """``root/{train,test}/cCLASS/*.png``: 20x20 images whose colour is their class's."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in range(classes):
            os.makedirs(root / split / f"c{c}")
            for i in range(per_split):
                pixels = np.full((20, 20, 3), 60 * c, np.uint8) + rng.integers(0, 40, (20, 20, 3),
                                                                                dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / f"c{c}" / f"{i}.png")
    return root


def test_transfer_to_an_image_folder(trained_run, tmp_path):
    _, workdir = trained_run
    root = _image_folder(tmp_path / "folder")
    results = evaluate_job.evaluate(str(workdir), [
        *FAST, "eval.data=folder", f"eval.data_root={root}", "eval.knn_k=3"])
    assert (results["data"], results["trained_on"]) == ("folder", "digits")
    assert (results["ssl"]["num_train"], results["ssl"]["num_test"]) == (18, 18)
    assert results["ssl"]["kmeans"]["k"] == 3  # the folder's classes
    assert results["tsne_picture"].endswith("tsne_folder_step6.png")
    assert "attention_picture" not in results
    saved = json.loads((workdir / "eval.json").read_text())
    assert saved["step_6_folder"]["ssl"] == results["ssl"]
    assert saved["latest"].get("data") != "folder"  # the run's own results stay where they were


@pytest.mark.parametrize("overrides, match", [
    (["eval.data=mnist"], r"config\.eval\.data='mnist' .*names no data available here"),
    (["eval.data=folder"], r"config\.eval\.data='folder' .*eval\.data_root"),
    (["eval.kmeans_k=129"], r"config\.eval\.kmeans_k: k-means with 129 clusters needs at least "
     r"129 test examples, and 128 are evaluated"),
    (["eval.tsne_perplexity=64"], r"config\.eval\.tsne_perplexity: must be below the 64 points"),
    (["eval.tsne_points=-1"], r"config\.eval\.tsne_points: must be >= 0"),
], ids=["unknown_dataset", "folder_without_root", "k_above_examples", "perplexity", "points"])
def test_bad_view_requests_name_the_key(trained_run, tmp_path, overrides, match):
    _, workdir = trained_run
    before = sorted(os.listdir(workdir))
    eval_json = (workdir / "eval.json").read_bytes() if (workdir / "eval.json").exists() else b""
    with pytest.raises(ConfigError, match=match):
        evaluate_job.evaluate(str(workdir), [*overrides, f"eval.export_features={tmp_path}/f"])
    assert sorted(os.listdir(workdir)) == before and not os.listdir(tmp_path)
    assert ((workdir / "eval.json").read_bytes() if eval_json else b"") == eval_json


def _python(*args, script=None, timeout=300):
    env = {**os.environ, "XLA_FLAGS": xla_env.xla_flags(), "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": REPO}
    argv = [sys.executable, *(["-c", script] if script else []), *args]
    return subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=timeout)


def test_existing_export_target_exits_2(trained_run, tmp_path):
    _, workdir = trained_run
    target = tmp_path / "feats.npz"
    target.write_bytes(b"mine")
    result = _python("-m", "ssl_jax.evaluate", "--workdir", str(workdir),
                     f"--config.eval.export_features={target}")
    assert result.returncode == cli.EXIT_USER_ERROR, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"error: config.eval.export_features='{target}': {target} exists")
    assert target.read_bytes() == b"mine"


PLAIN_SCRIPT = textwrap.dedent("""
    import sys

    import numpy as np

    from ssl_jax.data import pipeline
    from ssl_jax.evaluate import frozen


    def main():
        # Grain worker processes, as a run on real data uses; no absl flag parsing here.
        encoder = frozen.load_encoder(sys.argv[1], overrides=["data.num_workers=1"])
        x, y = encoder.embed_split("test")
        images = np.concatenate([b["image"][b["mask"]] for b in pipeline.eval_batches(
            encoder.config.data, "test", batch_size=64)])
        np.testing.assert_allclose(encoder.embed(images[:100]), x[:100], rtol=1e-5, atol=1e-5)
        frozen.save_features(sys.argv[2], {"test_features": x, "test_labels": y})
        print("embedded", x.shape, y.shape, encoder.step)


    if __name__ == "__main__":
        main()
""")


def test_python_api_from_a_plain_script(trained_run, tmp_path):
    """A script as a new user writes it: no absl.app.run, Grain workers on."""
    _, workdir = trained_run
    script = tmp_path / "embed.py"
    script.write_text(PLAIN_SCRIPT)
    out = tmp_path / "f.npz"
    result = _python(str(script), str(workdir), str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "embedded (360, " in result.stdout and "(360,) 6" in result.stdout
    assert np.load(out)["test_labels"].shape == (360,)
    assert math.isfinite(float(np.load(out)["test_features"].sum()))
