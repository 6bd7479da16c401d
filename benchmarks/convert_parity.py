"""Parity of the timm conversions, measured with timm itself (needs torch and timm besides the
project: ``pip install -e '.[torch]' timm``).

    python benchmarks/convert_parity.py [--quick]

For each model: timm -> JAX (a timm model with random weights, its ``state_dict`` imported by
``ssl_jax.convert``) and JAX -> timm (the project's encoder with random weights, exported and
loaded by ``timm.create_model(...)`` + the spec's patch lines + ``load_state_dict(strict=True)``):
the largest absolute difference between the two frameworks' features (float32, the same
normalised input, NCHW there and NHWC here), and that difference over the largest feature
(the criterion of the tests: at most 1e-5 of max(1, largest feature)).
Random weights: timm's / the project's initialisation, then every norm scale and bias, layer
scale and BatchNorm statistic drawn at random (so that each one matters). ``--quick`` runs the
small models the tests use (tests/test_convert_torch.py) instead of the full-size ones.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import timm
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.timm_parity_fixture import randomise  # noqa: E402
from ssl_jax.convert import fit, formats, timm_export  # noqa: E402
from ssl_jax.models import create_encoder  # noqa: E402

# name -> (the project's model config, input side, batch)
FULL = {
    "ViT-S/16 (224 px, 12 blocks)": (dict(name="vit_s16"), 224, 4),
    "ViT-B/16, mean pool, no cls token": (dict(name="vit_b16", use_cls_token=False,
                                               pool_type="mean"), 224, 2),
    "BEiT-B/16 (shared rel. pos. bias, layer scale)": (
        dict(name="vit_b16", pos_embed="none", rel_pos_bias=True, layer_scale_init=0.1,
             pool_type="mean"), 224, 2),
    "ResNet-18 (224 px)": (dict(name="resnet18"), 224, 4),
    "ResNet-50 (224 px)": (dict(name="resnet50"), 224, 2),
    "ResNet-18, CIFAR stem (32 px)": (dict(name="resnet18", cifar_stem=True), 32, 8),
}
QUICK = {
    "ViT-S/16-like (2 blocks, 32 px)": (dict(name="vit_s16", depth=2, layer_scale_init=0.1),
                                        32, 2),
    "ViT sin-cos, mean pool": (dict(name="vit_ti4", depth=2, pos_embed="sincos",
                                    pool_type="mean"), 16, 2),
    "ViT no cls token": (dict(name="vit_ti4", depth=1, use_cls_token=False), 16, 2),
    "BEiT-like": (dict(name="vit_s8", dim=64, depth=2, num_heads=4, pos_embed="none",
                       rel_pos_bias=True, layer_scale_init=0.1), 16, 2),
    "ResNet-18 x1/8": (dict(name="resnet18", width_multiplier=0.125), 32, 2),
    "ResNet-18, CIFAR stem, full width": (dict(name="resnet18", cifar_stem=True), 16, 2),
    "ResNet-50 x1/8, CIFAR stem": (dict(name="resnet50", width_multiplier=0.125,
                                        cifar_stem=True), 16, 2),
}


def project_encoder(model: dict, size: int):
    model = dict(model)
    return create_encoder(model.pop("name"), size, **model)


def timm_model(spec: dict) -> torch.nn.Module:
    """``timm.create_model(name, pretrained=False, **kwargs)`` and the spec's patch lines."""
    model = timm.create_model(spec["model_name"], pretrained=False, **spec["kwargs"])
    for line in spec["patch"]:
        exec(line, {"torch": torch, "model": model})  # the documented lines, verbatim
    return model.eval()


def random_variables(encoder, size: int, seed: int):
    """The project's initialisation, with every norm scale and bias, layer scale, relative
    position table and BatchNorm statistic drawn at random."""
    x = jnp.zeros((1, size, size, 3))
    variables = jax.tree_util.tree_map(
        np.asarray, jax.jit(lambda k: encoder.init(k, x, train=False))(jax.random.key(seed)))
    rng = np.random.default_rng(seed)

    def draw(path, a):
        leaf = str(getattr(path[-1], "key", path[-1]))
        if leaf in ("scale", "var"):
            return (0.5 + rng.random(a.shape)).astype(a.dtype)
        if leaf in ("bias", "mean", "gamma", "table"):
            return (0.2 * rng.standard_normal(a.shape)).astype(a.dtype)
        return a

    return jax.tree_util.tree_map_with_path(draw, variables)


def _errors(ours: np.ndarray, theirs: np.ndarray) -> dict[str, float]:
    diff = float(np.max(np.abs(ours - theirs)))
    return {"max_abs": diff, "relative": diff / float(np.max(np.abs(theirs)))}


def jax_to_timm(model: dict, size: int, batch: int, seed: int = 0) -> dict[str, float]:
    """The project's encoder exported to timm: both frameworks' features on one input."""
    encoder = project_encoder(model, size)
    variables = random_variables(encoder, size, seed)
    spec = timm_export.timm_spec(encoder)
    tensors = timm_export.timm_tensors(encoder, variables)
    net = timm_model(spec)
    net.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in tensors.items()},
                        strict=True)
    return _compare(net, encoder, variables, size, batch, seed)


def _compare(net, encoder, variables, size: int, batch: int, seed: int) -> dict[str, float]:
    """The errors between timm's and the project's features of the same random input."""
    x = np.random.default_rng(seed + 1).standard_normal((batch, 3, size, size), np.float32)
    with torch.no_grad():
        theirs = net(torch.from_numpy(x)).numpy()
    ours = np.asarray(jax.jit(lambda v, x: encoder.apply(v, x, train=False))(
        variables, jnp.asarray(x.transpose(0, 2, 3, 1))))
    return _errors(ours, theirs)


def timm_to_jax(model: dict, size: int, batch: int, seed: int = 0) -> dict[str, float]:
    """A random timm model (the spec the export writes for ``model``) imported."""
    encoder = project_encoder(model, size)
    net = timm_model(timm_export.timm_spec(encoder))
    torch.manual_seed(seed)
    randomise(net, torch.Generator().manual_seed(seed))
    if getattr(encoder, "pos_embed", None) == "sincos":  # a file of a sin-cos ViT holds the table
        table = timm_export.timm_tensors(encoder, random_variables(encoder, size, seed))
        with torch.no_grad():
            net.pos_embed.copy_(torch.from_numpy(table["pos_embed"]))
    state = {k: v.detach().numpy() for k, v in net.state_dict().items()}
    parts = formats.parts_of(state, "timm")
    initial = jax.tree_util.tree_map(lambda a: np.zeros(a.shape, a.dtype),
                                     fit.abstract_variables(encoder, size))
    variables, _ = fit.load_encoder(parts.encoder, initial, encoder, "the model", "")
    return _compare(net, encoder, variables, size, batch, seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the tests' small models")
    args = parser.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    print(f"torch {torch.__version__}, timm {timm.__version__}, jax {jax.__version__}, "
          f"{jax.default_backend()}")
    print("| model | timm -> JAX max abs (relative) | JAX -> timm max abs (relative) |")
    print("|---|---|---|")
    for name, (model, size, batch) in (QUICK if args.quick else FULL).items():
        a, b = timm_to_jax(model, size, batch), jax_to_timm(model, size, batch)
        print(f"| {name} | {a['max_abs']:.1e} ({a['relative']:.1e}) | "
              f"{b['max_abs']:.1e} ({b['relative']:.1e}) |", flush=True)


if __name__ == "__main__":
    main()
