r"""The project's multi-crop views of a run, written to a file that ``lightly_train.py --views``
trains on, to separate the input pipeline from the method when the two sides' accuracies differ::

    python -m benchmarks.dump_views --run RUN --data_root $HOME/.cache/ssl_jax/cifar10 \
        --out /tmp/views.npz
    /tmp/peers/bin/python benchmarks/lightly_train.py --run RUN --views /tmp/views.npz ...

``RUN`` is a project run directory (its ``config.json``: the views, batch size, seed and number of
steps). Images are read from ``DATA_ROOT/train/<class>/*`` (the layout of the CIFAR-10 folders),
shuffled once per epoch with the run's seed, and every batch goes through the method's own
``augment`` (jitted, on the default JAX device: multi-crop for DINO and iBOT, one view for SimMIM
and MAE), its ImageNet normalisation undone. Views are stored as uint8 (PIL's pipeline on the
peer's side is uint8 until ``ToTensor`` as well): ``globals [steps, batch, G, Sg, Sg, 3]`` (G = 1
for a single-view method) and ``locals [steps, batch, L, Sl, Sl, 3]`` (absent without local
crops).
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from ssl_jax import config as config_lib
from ssl_jax import methods
from ssl_jax.data import augment


def read_folder(root: str) -> np.ndarray:
    """Every image under ``root/<class>/``, sorted, as uint8 ``[n, h, w, 3]``."""
    if not os.path.isdir(root):
        sys.exit(f"dump_views: {root} is not a folder; pass --data_root with a train/ folder")
    paths = [os.path.join(root, c, f) for c in sorted(os.listdir(root))
             for f in sorted(os.listdir(os.path.join(root, c)))]
    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])


def views_of(method):
    """``(key, uint8 images) -> (globals, locals or None)`` as uint8 ``[batch, views, S, S, 3]``:
    the method's ``augment`` with its normalisation undone."""
    def to_uint8(x: jax.Array) -> jax.Array:
        return jnp.round(augment.denormalize(x) * 255.0).astype(jnp.uint8)

    def crop(key: jax.Array, x: jax.Array):
        out = method.augment(key, x)
        g, l_ = out if isinstance(out, tuple) else (out[:, None], None)
        return to_uint8(g), None if l_ is None else to_uint8(l_)
    return crop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="a project run directory (config.json)")
    parser.add_argument("--data_root", required=True, help="folder with train/<class>/ images")
    parser.add_argument("--out", required=True, help="the .npz to write (must not exist)")
    parser.add_argument("--steps", type=int, default=0, help="batches; 0: the run's total_steps")
    args = parser.parse_args()
    if os.path.exists(args.out):
        sys.exit(f"dump_views: {args.out} exists; choose another --out")
    with open(os.path.join(args.run, "config.json")) as f:
        config = config_lib.from_json(f.read())
    batch = config.batch_size
    steps = args.steps or config.total_steps
    if not steps:
        sys.exit("dump_views: the run has no total_steps; pass --steps")
    images = read_folder(os.path.join(args.data_root, "train"))
    crop = jax.jit(views_of(methods.create(config, None)))
    rng = np.random.default_rng(config.seed)
    key = jax.random.PRNGKey(config.seed)
    order, out_g, out_l = np.empty(0, np.int64), [], []
    for step in range(steps):
        if len(order) < batch:
            order = np.concatenate([order, rng.permutation(len(images))])
        index, order = order[:batch], order[batch:]
        g, l_ = crop(jax.random.fold_in(key, step), jnp.asarray(images[index]))
        out_g.append(np.asarray(g))
        if l_ is not None:
            out_l.append(np.asarray(l_))
    arrays = {"globals": np.stack(out_g)} | ({"locals": np.stack(out_l)} if out_l else {})
    np.savez(args.out, **arrays)
    print({k: v.shape for k, v in arrays.items()})


if __name__ == "__main__":
    main()
