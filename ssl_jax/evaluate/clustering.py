"""Views of frozen features beyond the linear probe and kNN: k-means clustering scored against the
labels, and a t-SNE picture of the features coloured by class.

k-means (scikit-learn, k-means++ starts, ``n_init`` restarts, the best inertia kept) runs on the
L2-normalised test features, as kNN compares them by cosine. Its clusters are scored against
the classes by

- NMI, normalised mutual information ``I(C; Y) / mean(H(C), H(Y))`` (arithmetic mean, sklearn's
  default), 0 for independent assignments, 1 for the same partition;
- ARI, the adjusted Rand index: pair agreement corrected for chance (0 at chance, 1 perfect);
- cluster accuracy: the fraction of examples whose cluster's class, under the one-to-one
  matching of clusters to classes that maximises it (Hungarian algorithm on the contingency
  table, ``scipy.optimize.linear_sum_assignment``), is their class. With k > classes the
  unmatched clusters count as wrong.

t-SNE (scikit-learn, PCA initialisation) maps a seeded subset of the test features to 2-D;
:func:`write_scatter` draws one panel per encoder (PIL only, as ``pictures.py``), each point
coloured by its class.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from etils import epath
from PIL import Image, ImageDraw

from ssl_jax.evaluate.pictures import save_png

# Ten well separated colours (Tableau 10), then a golden-angle hue walk for more classes.
PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))
PANEL = 360  # pixels of a scatter panel's side
TITLE = 18  # pixels above a panel for its title


def cluster_accuracy(labels: np.ndarray, clusters: np.ndarray) -> float:
    """Accuracy of ``clusters`` ``[n]`` against ``labels`` ``[n]`` under the best one-to-one
    matching of cluster ids to labels (Hungarian algorithm on the contingency table)."""
    from scipy.optimize import linear_sum_assignment

    labels, clusters = np.asarray(labels), np.asarray(clusters)
    _, y = np.unique(labels, return_inverse=True)
    _, c = np.unique(clusters, return_inverse=True)
    table = np.zeros((c.max() + 1, y.max() + 1), np.int64)
    np.add.at(table, (c, y), 1)
    rows, cols = linear_sum_assignment(table, maximize=True)
    return float(table[rows, cols].sum() / len(labels))


def l2_normalize(features: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return features / np.maximum(norms, 1e-12)


def kmeans_scores(features: np.ndarray, labels: np.ndarray, k: int, seed: int, n_init: int = 10
                  ) -> dict[str, Any]:
    """k-means with ``k`` clusters on the L2-normalised ``features`` ``[n, d]``: NMI, ARI and
    cluster accuracy against ``labels`` ``[n]`` (module docstring)."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    if not 1 <= k <= len(labels):
        raise ValueError(f"k-means needs 1 <= k <= {len(labels)} examples, got k={k}")
    clusters = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit_predict(
        l2_normalize(np.asarray(features, np.float64)))
    return {"nmi": float(normalized_mutual_info_score(labels, clusters)),
            "ari": float(adjusted_rand_score(labels, clusters)),
            "cluster_accuracy": cluster_accuracy(labels, clusters),
            "k": int(k), "num_examples": int(len(labels))}


def tsne_points(features: np.ndarray, perplexity: float, seed: int) -> np.ndarray:
    """``[n, 2]`` t-SNE map of ``features`` ``[n, d]`` (PCA initialisation, seeded)."""
    from sklearn.manifold import TSNE

    if not 0 < perplexity < len(features):
        raise ValueError(f"t-SNE needs 0 < perplexity < {len(features)} points, got {perplexity}")
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed)
    return tsne.fit_transform(np.asarray(features, np.float64)).astype(np.float32)


def class_color(label: int) -> tuple[int, int, int]:
    if label < len(PALETTE):
        return PALETTE[label]
    import colorsys

    r, g, b = colorsys.hsv_to_rgb((label * 0.381966) % 1.0, 0.75, 0.85)
    return int(255 * r), int(255 * g), int(255 * b)


def scatter_panel(points: np.ndarray, labels: np.ndarray, title: str) -> Image.Image:
    """One ``PANEL`` x ``PANEL + TITLE`` picture: ``points`` ``[n, 2]`` scaled to the panel,
    each a dot of its class's colour, the title above."""
    image = Image.new("RGB", (PANEL, PANEL + TITLE), "white")
    draw = ImageDraw.Draw(image)
    draw.text((4, 3), title, fill=(0, 0, 0))
    lo, hi = points.min(axis=0), points.max(axis=0)
    scale = (PANEL - 12) / np.maximum(hi - lo, 1e-9)
    xy = (points - lo) * scale + 6
    for (x, y), label in zip(xy, labels, strict=True):
        draw.ellipse((x - 2, TITLE + y - 2, x + 2, TITLE + y + 2), fill=class_color(int(label)))
    return image


def write_scatter(panels: list[tuple[str, np.ndarray, np.ndarray]], path: epath.PathLike
                  ) -> str:
    """Writes the panels ``(title, points [n, 2], labels [n])`` side by side, with a legend row
    of the classes' colours below, as PNG at ``path``; returns the path."""
    tiles = [scatter_panel(points, labels, title) for title, points, labels in panels]
    classes = sorted({int(c) for _, _, labels in panels for c in labels})
    legend_rows = -(-len(classes) // 10)
    out = Image.new("RGB", (len(tiles) * (PANEL + 4), PANEL + TITLE + 16 * legend_rows + 4),
                    "white")
    for i, tile in enumerate(tiles):
        out.paste(tile, (i * (PANEL + 4), 0))
    draw = ImageDraw.Draw(out)
    for i, label in enumerate(classes):
        x, y = 6 + (i % 10) * 34, PANEL + TITLE + 2 + 16 * (i // 10)
        draw.rectangle((x, y + 3, x + 8, y + 11), fill=class_color(label))
        draw.text((x + 11, y + 1), str(label), fill=(0, 0, 0))
    save_png(out, path)
    return str(path)
