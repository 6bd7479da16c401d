"""Evaluation of a visual tokenizer (a method with ``token_ids`` and ``decode_tokens``: the dVAE).

Over the test split (its first ``config.eval.max_test_examples`` examples in the evaluation
order, 0: all), seen through the evaluation's centre crop at the tokenizer's input size:

- ``hard_recon_mse``: mean squared error, on the normalised image, of the reconstruction from
  the hard tokens (argmax of q(z | x), decoded as one-hot codes: the tokenizer as BEiT uses it);
- ``code_perplexity``: ``exp(H(p))`` of the usage histogram ``p`` of the hard tokens over all
  test grid cells (``V`` for uniform use, 1 for a single token);
- ``unused_tokens``: tokens that no test grid cell takes, and ``tokens_used = V - unused``.

``DIR/token_usage_step{N}.png`` (PIL only) draws the histogram twice: by token id (top) and
sorted by frequency (bottom), one bar per token, or per bin of neighbouring tokens when ``V`` is
larger than the plot is wide (each bin showing its largest count).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from PIL import Image, ImageDraw

from ssl_jax import parallel
from ssl_jax.data import pipeline
from ssl_jax.evaluate.features import eval_view
from ssl_jax.evaluate.pictures import save_png

PLOT_WIDTH = 512  # pixels of a histogram panel's plot area
PLOT_HEIGHT = 160
MARGIN = 24
BAR = (40, 11, 84)


def is_tokenizer(method: Any) -> bool:
    """True for methods that tokenize images (``token_ids`` + ``decode_tokens``)."""
    return all(hasattr(method, name) for name in
               ("token_ids", "decode_tokens", "vocab_size", "image_size"))


def usage_statistics(counts: np.ndarray) -> dict[str, float]:
    """``counts [V]`` (how often each token is taken) -> perplexity and unused tokens."""
    counts = np.asarray(counts, np.float64)
    p = counts / max(counts.sum(), 1.0)
    nonzero = p[p > 0]
    unused = int(np.sum(counts == 0))
    return {"code_perplexity": float(np.exp(-np.sum(nonzero * np.log(nonzero)))),
            "unused_tokens": unused, "tokens_used": int(len(counts) - unused)}


def evaluate_tokenizer(
    method: Any, params: Any, config: ml_collections.ConfigDict, mesh: Mesh,
    workdir: epath.PathLike, step: int,
) -> dict[str, Any] | None:
    """The tokenizer's figures on the test split and ``DIR/token_usage_step{step}.png``;
    None when ``method`` is no tokenizer. Every process runs the (sharded) passes; process 0
    writes the picture."""
    if not is_tokenizer(method):
        return None
    vocab, size = method.vocab_size, method.image_size
    limit = config.eval.max_test_examples or None

    @jax.jit
    def tokens_and_errors(params, images):
        x = eval_view(images, size)
        ids = method.token_ids(params, x)
        recon = method.decode_tokens(params, ids)
        return ids, jnp.mean(jnp.square(recon - x), axis=(1, 2, 3))

    counts = np.zeros(vocab, np.int64)
    squared_error, seen = 0.0, 0
    for batch in pipeline.eval_batches(
        config.data, config.data.test_split, batch_size=config.eval.batch_size,
        process_index=jax.process_index(), process_count=jax.process_count(),
    ):
        arrays = parallel.global_batch(batch, mesh)
        ids, errors = tokens_and_errors(params, arrays["image"])
        out = multihost_utils.process_allgather(
            {"ids": ids, "e": errors, "m": arrays["mask"]}, tiled=True)
        keep = np.asarray(out["m"]).astype(bool)
        if limit is not None:  # the first `limit` real examples
            keep &= np.cumsum(keep) <= limit - seen
        counts += np.bincount(np.asarray(out["ids"])[keep].ravel(), minlength=vocab)
        squared_error += float(np.sum(np.asarray(out["e"], np.float64)[keep]))
        seen += int(keep.sum())
        if limit is not None and seen >= limit:
            break
    results = {"hard_recon_mse": squared_error / max(seen, 1), "num_test": seen,
               "vocab_size": vocab, **usage_statistics(counts)}
    path = epath.Path(workdir) / f"token_usage_step{step}.png"
    if parallel.is_main_process():
        save_png(usage_figure(counts, title=f"step {step}: {results['tokens_used']} of {vocab} "
                              f"tokens used, perplexity {results['code_perplexity']:.1f}"), path)
    results["token_usage_picture"] = str(path)
    return results


def _bars(counts: np.ndarray, width: int) -> np.ndarray:
    """``counts [V]`` -> ``[min(V, width)]`` bar values (the largest count of each bin)."""
    bins = min(len(counts), width)
    edges = np.linspace(0, len(counts), bins + 1).round().astype(int)
    return np.array([counts[a:b].max() for a, b in zip(edges[:-1], edges[1:], strict=True)])


def usage_figure(counts: np.ndarray, title: str = "") -> Image.Image:
    """Two bar charts of ``counts [V]``: by token id, then sorted by frequency (descending).
    Bars scale linearly to the largest count; a grey baseline marks zero."""
    counts = np.asarray(counts, np.int64)
    height = 2 * (PLOT_HEIGHT + 2 * MARGIN)
    canvas = Image.new("RGB", (PLOT_WIDTH + 2 * MARGIN, height), "white")
    draw = ImageDraw.Draw(canvas)
    top_count = max(int(counts.max(initial=0)), 1)
    panels = (("by token id", counts), ("sorted by use", np.sort(counts)[::-1]))
    for row, (label, values) in enumerate(panels):
        top = row * (PLOT_HEIGHT + 2 * MARGIN) + MARGIN
        bottom = top + PLOT_HEIGHT
        text = f"{title}  |  {label} (max {top_count})" if row == 0 else label
        draw.text((MARGIN, top - MARGIN + 6), text, fill="black")
        bars = _bars(values, PLOT_WIDTH)
        step = PLOT_WIDTH / len(bars)
        for i, value in enumerate(bars):
            if value <= 0:
                continue
            left = MARGIN + int(i * step)
            right = max(MARGIN + int((i + 1) * step) - 1, left)
            bar_top = bottom - max(int(round(PLOT_HEIGHT * value / top_count)), 1)
            draw.rectangle((left, bar_top, right, bottom), fill=BAR)
        draw.line((MARGIN, bottom, MARGIN + PLOT_WIDTH, bottom), fill=(160, 160, 160))
    return canvas
