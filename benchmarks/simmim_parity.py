r"""SimMIM's maths against lightly's: the same weights, images and mask through lightly's SimMIM
example (``benchmarks/lightly_models.SimMIM``) and the project's ``SimMIM``; the encoder's
tokens, the loss and its gradients must agree. It rules the method itself in or out when the
two sides' accuracies differ at equal steps (docs/benchmarks/simmim_ibot.md, "SimMIM beside
lightly")::

    /tmp/peers/bin/python benchmarks/simmim_parity.py --side lightly --run RUN --dir D
    python -m benchmarks.simmim_parity --side project --dir D

``RUN`` is a project SimMIM run directory (its ``config.json``: ViT, masks). The lightly side
(the peers' Python, ``bash ../shared/peers/setup.sh /tmp/peers``) builds lightly's model at its
initial weights (torch seed ``--seed``), draws a batch of 4 random images and lightly's masks,
and writes ``D/backbone.safetensors`` (the encoder, timm keys) and ``D/case.npz`` (images, mask,
decoder, loss, gradients). The project side imports the encoder (``ssl_jax.convert import
--model_from_file``), gives its head lightly's decoder, and prints the largest relative
difference of each quantity; it exits 1 when one exceeds ``--tol``. No stochastic depth: both
run in evaluation mode.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

BATCH = 4


def lightly_side(run: str, out: str, seed: int) -> None:
    import torch
    from lightly.models import utils
    from lightly_models import SimMIM
    from safetensors.torch import save_file

    with open(os.path.join(run, "config.json")) as f:
        config = json.load(f, object_hook=lambda d: d.get("__tuple__", d))
    torch.manual_seed(seed)
    model = SimMIM(config, 1).eval()
    size = config["aug"]["view1"]["size"]
    x = torch.randn(BATCH, 3, size, size)
    mask = model.masks(BATCH, x.device)  # [batch, 1 + N], the cls token never masked
    tokens = model.backbone.encode(x, mask=mask)
    loss = model.criterion(model.decoder(tokens[mask]),
                           utils.patchify(x, model.patch)[mask[:, 1:]])
    loss.backward()
    vit = model.backbone.vit
    grads = {"mask_token": model.backbone.mask_token.grad[0, 0],
             "patch_kernel": vit.patch_embed.proj.weight.grad.permute(2, 3, 1, 0),
             "qkv_kernel_0": vit.blocks[0].attn.qkv.weight.grad.T,
             "head_kernel": model.decoder.weight.grad.T, "head_bias": model.decoder.bias.grad}
    os.makedirs(out, exist_ok=True)
    save_file({k: v.detach().contiguous().clone() for k, v in model.exported().items()},
              os.path.join(out, "backbone.safetensors"))
    np.savez(os.path.join(out, "case.npz"), x=x.permute(0, 2, 3, 1).numpy(),
             mask=mask[:, 1:].numpy(), tokens=tokens.detach().numpy(), loss=loss.item(),
             head_kernel=model.decoder.weight.detach().T.numpy(),
             head_bias=model.decoder.bias.detach().numpy(),
             **{"grad_" + k: v.numpy() for k, v in grads.items()})


def project_side(out: str) -> dict[str, float]:
    import jax
    import jax.numpy as jnp

    from ssl_jax import parallel
    from ssl_jax.methods.simmim import simmim_loss
    from ssl_jax.methods.ssl_math import patchify
    from ssl_jax.restore import restore_run

    workdir = os.path.join(out, "imported")
    if not os.path.isdir(workdir):
        subprocess.run([sys.executable, "-m", "ssl_jax.convert", "import", "--weights",
                        os.path.join(out, "backbone.safetensors"), "--model_from_file",
                        "--config", "configs/simmim.py:data=cifar10", "--workdir", workdir],
                       check=True, capture_output=True)
    _, method, state, _ = restore_run(workdir, parallel.make_mesh(1))
    case = np.load(os.path.join(out, "case.npz"))
    x, mask = jnp.asarray(case["x"]), jnp.asarray(case["mask"])
    params = {"encoder": jax.device_get(state["params"]["encoder"]),
              "head": {"kernel": case["head_kernel"], "bias": case["head_bias"]}}
    tokens = method.encoder.apply({"params": params["encoder"]}, x, train=False,
                                  return_tokens=True, bool_masked_pos=mask)

    def loss_fn(p):
        pred = method.predict(p, x, mask, False)
        return simmim_loss(pred, patchify(x, method.patch), mask)[0]

    loss, grads = jax.value_and_grad(loss_fn)(params)
    enc = grads["encoder"]
    ours = {"tokens": tokens, "loss": loss, "grad_mask_token": enc["mask_token"][0, 0],
            "grad_patch_kernel": enc["patch_embed"]["kernel"],
            "grad_qkv_kernel_0": enc["blocks_0"]["attn"]["qkv"]["kernel"],
            "grad_head_kernel": grads["head"]["kernel"], "grad_head_bias": grads["head"]["bias"]}
    return {k: float(np.abs(np.asarray(v) - case[k]).max() / (np.abs(case[k]).max() + 1e-12))
            for k, v in ours.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", choices=("lightly", "project"), required=True)
    parser.add_argument("--run", default="", help="lightly side: a project SimMIM run (its "
                        "config.json gives the ViT and the masks)")
    parser.add_argument("--dir", required=True, help="where the lightly side writes its case")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tol", type=float, default=1e-4, help="largest relative difference")
    args = parser.parse_args()
    if args.side == "lightly":
        if not os.path.exists(os.path.join(args.run, "config.json")):
            sys.exit(f"simmim_parity: no config.json in --run {args.run!r}; pass a SimMIM run")
        lightly_side(args.run, args.dir, args.seed)
        print(f"wrote {args.dir}/backbone.safetensors and case.npz; now the project side")
        return
    if not os.path.exists(os.path.join(args.dir, "case.npz")):
        sys.exit(f"simmim_parity: {args.dir}/case.npz is missing; run --side lightly first")
    diffs = project_side(args.dir)
    for k, v in diffs.items():
        print(f"{k:20s} relative difference {v:.2e}")
    worst = max(diffs.values())
    print(f"largest {worst:.2e} ({'within' if worst <= args.tol else 'above'} {args.tol:g})")
    sys.exit(0 if worst <= args.tol else 1)


if __name__ == "__main__":
    main()
