r"""Bytes of train state per device, replicated (``mesh.fsdp=1``) vs FSDP (``mesh.fsdp=8``).

    python -m benchmarks.state_bytes                       # MAE and DINO, ViT-B/16 and ViT-L/16
    python -m benchmarks.state_bytes --configs configs/mae.py:data=imagenet2012,model=vit_h14

The state is the trainer's (``ssl_jax.step.build_state``): trainable params, the optimizer state
and the method's extras (DINO's EMA teacher and centre, BatchNorm statistics), laid out by the
config's sharding rules, ``(('.*', 'replicate'),)`` for fsdp=1 and ``(('.*', 'fsdp'),)`` for
fsdp=8, over a mesh of 8 forced CPU devices. Only shapes are computed (``jax.eval_shape``);
nothing is allocated. A leaf counts ``prod(sharding.shard_shape(shape)) * itemsize`` bytes on each
device, so a leaf none of whose dimensions divides by 8 stays whole on every device.
Activations, gradients and XLA's temporaries are not included.
"""

from __future__ import annotations

import os

# Before JAX starts: 8 CPU devices for the mesh (no accelerator is needed, nothing is allocated).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.throughput import load_config  # noqa: E402
from ssl_jax import methods, parallel  # noqa: E402
from ssl_jax.step import build_state  # noqa: E402

DEFAULT_CONFIGS = (
    "configs/mae.py:data=imagenet2012,model=vit_b16",
    "configs/mae.py:data=imagenet2012,model=vit_l16",
    "configs/dino.py:data=imagenet2012,model=vit_b16",
    "configs/dino.py:data=imagenet2012,model=vit_l16",
)
PARTS = ("params", "opt_state", "extra")
FSDP_SIZES = (1, 8)


def device_bytes(abstract: Any) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the most loaded device)."""
    return sum(int(np.prod(leaf.sharding.shard_shape(leaf.shape))) * leaf.dtype.itemsize
               for leaf in jax.tree_util.tree_leaves(abstract))


def state_layout(spec: str, fsdp: int) -> tuple[Any, Any]:
    """``(config, abstract state)`` of config ``spec`` laid out over ``fsdp``-way FSDP."""
    rules = ((".*", "fsdp"),) if fsdp > 1 else ((".*", "replicate"),)
    config = load_config(spec, {"mesh.fsdp": fsdp, "sharding_rules": rules})
    mesh = parallel.make_mesh(fsdp)
    steps_per_epoch = 1000  # schedules only; shapes do not depend on them
    total = int(config.num_epochs * steps_per_epoch)
    method = methods.create(config, mesh, total_steps=total, steps_per_epoch=steps_per_epoch)
    return config, build_state(config, mesh, method, total, steps_per_epoch).abstract


def measure(spec: str) -> dict[str, Any]:
    row: dict[str, Any] = {"config": spec}
    for fsdp in FSDP_SIZES:
        config, abstract = state_layout(spec, fsdp)
        row["model"] = config.model.name
        row["num_params"] = sum(x.size for x in jax.tree_util.tree_leaves(abstract["params"]))
        for part in PARTS:
            row[f"{part}_{fsdp}"] = device_bytes(abstract[part])
        row[f"total_{fsdp}"] = device_bytes(abstract)
    return row


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f}"


def markdown(rows: list[dict[str, Any]], command: str) -> str:
    lo, hi = FSDP_SIZES
    head = (f"| config | model | trainable params | params / opt state / extras, fsdp={lo} "
            f"(GiB) | total fsdp={lo} (GiB) | params / opt state / extras, fsdp={hi} (GiB) "
            f"| total fsdp={hi} (GiB) | fsdp={hi} / fsdp={lo} |")
    lines = [f"`{command}` (bytes per device over a mesh of {jax.device_count()} devices)", "",
             head, "|" + "---|" * 8]
    for r in rows:
        parts = {f: " / ".join(_gib(r[f"{p}_{f}"]) for p in PARTS) for f in FSDP_SIZES}
        lines.append(
            f"| `{r['config']}` | {r['model']} | {r['num_params'] / 1e6:.1f} M | {parts[lo]} | "
            f"{_gib(r[f'total_{lo}'])} | {parts[hi]} | {_gib(r[f'total_{hi}'])} | "
            f"{r[f'total_{hi}'] / r[f'total_{lo}']:.4f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS),
                        help="config specs, configs/X.py:ARG")
    args = parser.parse_args(argv)
    if jax.device_count() != 8:
        sys.exit(f"needs 8 devices, found {jax.device_count()}: run on CPU (JAX_PLATFORMS=cpu)")
    command = "python -m benchmarks.state_bytes" + "".join(
        f" {shlex.quote(a)}" for a in (argv if argv is not None else sys.argv[1:]))
    print(markdown([measure(spec) for spec in args.configs], command))


if __name__ == "__main__":
    main()
