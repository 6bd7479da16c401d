r"""The peer side of the accuracy comparison: lightly's CIFAR-10 recipe, trained with PyTorch on
the same images, backbone, batch, number of steps and views as a project run, its backbone
written as a ``safetensors`` file with timm/torchvision ResNet keys that the project imports
(``ssl_jax.convert``) and evaluates with its own evaluation job (so both encoders meet the same
linear probe and kNN)::

    /tmp/peers/bin/python benchmarks/lightly_train.py --run RUN \
        --data_root $HOME/.cache/ssl_jax/cifar10 --out /tmp/lightly_run
    python -m ssl_jax.convert import --weights /tmp/lightly_run/backbone.safetensors \
        --model_from_file --config configs/moco_v2.py:data=cifar10 --workdir /tmp/lightly_eval
    python -m ssl_jax.evaluate --workdir /tmp/lightly_eval

Runs under the peers' Python (``bash ../shared/peers/setup.sh /tmp/peers``) and never imports
JAX. ``--run`` is a project run directory: its ``config.json`` gives the method (a key of
``lightly_models.MODELS``: ``byol``, ``moco_v2``, ``moco_v3``, ``simmim``, ``ibot``), the batch
size, the number of steps (``total_steps`` as the run's trainer computed it, or ``--steps``), the
backbone's shape and the views. BYOL and MoCo v2 are lightly's ``cifar10_benchmark.py``
(``BYOLModel`` / ``MocoModel``): lightly's ``ResNetGenerator('resnet-18')`` (the CIFAR stem;
8 split BatchNorm groups with shuffled keys for MoCo), lightly's heads with the run's sizes,
``NegativeCosineSimilarity`` / ``NTXentLoss`` with a memory bank, momentum 0.99, SGD with
momentum 0.9, LR 6e-2 x B/128, weight decay 5e-4 and a cosine to zero, here stepped per step
(the benchmark steps it per epoch) to match the project's schedule; MoCo v3, which the benchmark
lacks, is built from the same pieces and trained the same way. Their views are lightly's
``BYOLView1Transform`` with the run's ``aug.view1`` / ``aug.view2`` values. SimMIM and iBOT follow
lightly's examples (classes ``SimMIM``, ``IBOT``) with the run's views (iBOT: lightly's
``IBOTViewTransform`` for each global and local crop), AdamW with the run's schedules (LR and
weight decay), decay mask and gradient clipping.

On a machine where torch sees a GPU it trains there (``--device auto``; ``--workers`` data
loader processes, ``--max_seconds`` stops early and records the steps reached).

Writes ``OUT/backbone.safetensors`` (timm's ``VisionTransformer`` keys for the ViTs, iBOT's
teacher, the encoder the project evaluates; else
timm/torchvision ``resnet`` key names, running statistics
averaged over the split groups), ``OUT/model.json`` (the run's model config: the project's ResNet
of the same shape) and ``OUT/log.jsonl`` (loss and seconds per step, data loading excluded).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Iterator

import torch
import torchvision
import torchvision.transforms as T
from lightly.transforms import BYOLView1Transform
from lightly.transforms.ibot_transform import IBOTViewTransform
from lightly.transforms.multi_view_transform import MultiViewTransform
from lightly.transforms.utils import IMAGENET_NORMALIZE
from lightly_models import MODELS
from safetensors.torch import save_file
from torch import nn


def pil_blur_p(view: dict) -> float:
    """The view's blur probability; lightly blurs with PIL's Gaussian, so a blurred view must
    use the project's ``blur_kernel='pil'``."""
    p = view.get("blur_p", 0.0)
    if p and view.get("blur_kernel") != "pil":
        sys.exit("lightly_train.py: lightly blurs with PIL's Gaussian; a view with blur_p > 0 "
                 f"needs blur_kernel='pil' (this one has {view.get('blur_kernel')!r})")
    return p


def view_transform(view: dict) -> BYOLView1Transform:
    """lightly's BYOL view (crop, flip, jitter, grey, blur, solarize) with the project view's
    values."""
    return BYOLView1Transform(
        input_size=view["size"], cj_prob=view["color_jitter_p"], cj_strength=view["color_jitter"],
        cj_bright=view["brightness"], cj_contrast=view["contrast"], cj_sat=view["saturation"],
        cj_hue=view["hue"], min_scale=view["crop_scale"][0], random_gray_scale=view["grayscale_p"],
        gaussian_blur=pil_blur_p(view), sigmas=tuple(view["blur_sigma"]),
        solarization_prob=view.get("solarize_p", 0.0), hf_prob=0.5 if view["flip"] else 0.0)


def multicrop_transform(aug: dict) -> MultiViewTransform:
    """iBOT's crops as lightly's ``IBOTViewTransform``s with the run's values: two global
    crops (``view1``, ``view2``) and ``num_local_crops`` of ``local``."""
    def one(view: dict) -> IBOTViewTransform:
        return IBOTViewTransform(
            crop_size=view["size"], crop_scale=tuple(view["crop_scale"]),
            hf_prob=0.5 if view["flip"] else 0.0, cj_prob=view["color_jitter_p"],
            cj_strength=view["color_jitter"], cj_bright=view["brightness"],
            cj_contrast=view["contrast"], cj_sat=view["saturation"], cj_hue=view["hue"],
            random_gray_scale=view["grayscale_p"], gaussian_blur=pil_blur_p(view),
            sigmas=tuple(view["blur_sigma"]), solarization_prob=view.get("solarize_p", 0.0))
    return MultiViewTransform([one(aug["view1"]), one(aug["view2"])]
                              + [one(aug["local"])] * aug.get("num_local_crops", 0))


def simmim_transform(view: dict) -> T.Compose:
    """SimMIM's views: a random resized crop and a flip, normalised (no colour)."""
    return T.Compose([
        T.RandomResizedCrop(view["size"], scale=tuple(view["crop_scale"]),
                            ratio=tuple(view["crop_ratio"])),
        T.RandomHorizontalFlip(0.5 if view["flip"] else 0.0), T.ToTensor(),
        T.Normalize(IMAGENET_NORMALIZE["mean"], IMAGENET_NORMALIZE["std"])])


def adamw(model: nn.Module, o: dict, batch: int, steps: int, steps_per_epoch: int):
    """The run's AdamW: weight decay on kernels only unless ``decay_all`` (not on biases, norm
    parameters, tokens and position embeddings, as the project's ``decay_mask``), following a
    cosine to ``weight_decay_end`` when that is > 0; LR: linear warm-up, then a cosine to
    ``end_lr_factor``. Returns ``(optimizer, set_step)``; ``set_step(step)`` sets both."""
    peak = o["base_lr"] * batch / 256
    warmup = round(o["warmup_epochs"] * steps_per_epoch)
    trained = {id(p) for p in model.trained()}
    decay, plain = [], []
    for name, p in model.named_parameters():
        if id(p) in trained:
            keep = o.get("decay_all") or (p.ndim > 1 and not any(
                t in name for t in ("cls_token", "mask_token", "pos_embed")))
            (decay if keep else plain).append(p)
    optim = torch.optim.AdamW([{"params": decay}, {"params": plain, "weight_decay": 0.0}],
                              lr=peak, betas=(o["b1"], o["b2"]), weight_decay=o["weight_decay"])

    def set_step(step: int) -> None:
        if step < warmup:
            lr = peak * step / warmup
        else:
            end = peak * o["end_lr_factor"]
            t = (step - warmup) / max(1, steps - warmup)
            lr = end + (peak - end) * 0.5 * (1 + math.cos(math.pi * t))
        wd, wd_end = o["weight_decay"], o.get("weight_decay_end", 0.0)
        if wd_end > 0:
            wd = wd_end + (wd - wd_end) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in optim.param_groups:
            group["lr"] = lr
        optim.param_groups[0]["weight_decay"] = wd

    return optim, set_step


def lightly_sgd(model: nn.Module, batch: int, steps: int):
    """lightly's CIFAR-10 benchmark optimizer: SGD, momentum 0.9, LR 6e-2 x B/128, weight decay
    5e-4 on every parameter, a cosine to zero (stepped per step here)."""
    lr = 6e-2 * batch / 128
    optim = torch.optim.SGD(model.trained(), lr=lr, momentum=0.9, weight_decay=5e-4)

    def set_step(step: int) -> None:
        for group in optim.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))

    return optim, set_step


def clip_gradients(params: list[nn.Parameter], norm: float, kind: str) -> None:
    """The run's clipping: one global norm, or each parameter to its own (DINO's code)."""
    if norm <= 0:
        return
    if kind == "per_parameter":
        for p in params:
            if p.grad is not None:
                torch.nn.utils.clip_grad_norm_([p], norm)
    else:
        torch.nn.utils.clip_grad_norm_(params, norm)


def timm_state_dict(net: nn.Module, num_splits: int) -> dict[str, torch.Tensor]:
    """lightly's ResNet keys -> timm ``resnet`` keys (``shortcut`` -> ``downsample``); split
    BatchNorm statistics averaged over their groups (what lightly's eval mode uses)."""
    out = {}
    for key, value in net.state_dict().items():
        if key.startswith("linear"):
            continue
        parts = key.split(".")
        if key.startswith("layer"):
            key = ".".join(parts[:2] + ["downsample"] + parts[3:]) if parts[2] == "shortcut" \
                else key
        if key.endswith(("running_mean", "running_var")) and num_splits:
            value = value.view(num_splits, -1).mean(0)
        out[key] = value.detach().contiguous().clone()
    return out


def dumped_views(path: str, steps: int) -> Iterator[tuple[list[torch.Tensor], None]]:
    """The batches of ``benchmarks/dump_views.py``'s file as the loader's ``(views, labels)``:
    every global, then every local crop, ``[batch, 3, size, size]`` normalised as lightly's."""
    import numpy as np

    with np.load(path) as f:
        crops = [f["globals"]] + ([f["locals"]] if "locals" in f else [])
    if len(crops[0]) < steps:
        sys.exit(f"lightly_train.py: {path} holds {len(crops[0])} batches, the run needs {steps}; "
                 "dump them with --steps or pass a smaller --steps here")
    mean, std = (torch.tensor(IMAGENET_NORMALIZE[k]).view(1, 3, 1, 1) for k in ("mean", "std"))

    def batch(step: int) -> list[torch.Tensor]:
        return [(torch.from_numpy(c[step, :, v]).permute(0, 3, 1, 2).float() / 255.0 - mean) / std
                for c in crops for v in range(c.shape[2])]

    return ((batch(step), None) for step in range(steps))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="project run directory (its config.json)")
    parser.add_argument("--data_root", required=True, help="image folders: ROOT/train/CLASS/*")
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=0, help="0: the run's total steps")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    parser.add_argument("--max_seconds", type=float, default=0.0,
                        help="stop after this long (the steps reached are recorded); 0: never")
    parser.add_argument("--device", default="auto", help="'cpu', 'cuda' or 'auto' (cuda if seen)")
    parser.add_argument("--views", default="",
                        help="train on the project's views of the run (benchmarks/dump_views.py "
                             "writes them) instead of lightly's transforms")
    args = parser.parse_args()
    with open(os.path.join(args.run, "config.json")) as f:
        config = json.load(f, object_hook=lambda d: d.get("__tuple__", d))
    method = config["method"]
    if method not in MODELS:
        sys.exit(f"lightly_train.py: method {method!r} has no lightly CIFAR-10 recipe here; "
                 f"choose a run of {', '.join(MODELS)}")
    if os.path.exists(os.path.join(args.out, "backbone.safetensors")):
        sys.exit(f"lightly_train.py: {args.out}/backbone.safetensors exists; choose another --out")
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(args.threads)
    torch.manual_seed(config.get("seed", 0))
    batch = config["batch_size"]
    steps_per_epoch = 50000 // batch
    steps = (args.steps or config.get("total_steps", 0)
             or int(round(config["num_epochs"] * steps_per_epoch)))
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu")
                          if args.device == "auto" else args.device)
    model = MODELS[method](config, steps_per_epoch).to(device)
    aug, o = config["aug"], config["optim"]
    if method == "simmim":
        transform = simmim_transform(aug["view1"])
    elif method == "ibot":
        transform = multicrop_transform(aug)
    else:
        transform = MultiViewTransform([view_transform(aug["view1"]), view_transform(aug["view2"])])
    if method in ("simmim", "ibot"):  # the examples' AdamW with the run's schedule and clipping
        optim, set_step = adamw(model, o, batch, steps, steps_per_epoch)
        clip, clip_kind = o["grad_clip_norm"], o.get("grad_clip_kind", "global")
    else:  # lightly's CIFAR-10 benchmark: SGD, no clipping
        optim, set_step = lightly_sgd(model, batch, steps)
        clip, clip_kind = 0.0, "global"
    trained = model.trained()
    if args.views:
        loader = dumped_views(args.views, steps)
    else:
        data = torchvision.datasets.ImageFolder(os.path.join(args.data_root, "train"), transform)
        loader = torch.utils.data.DataLoader(data, batch_size=batch, shuffle=True,
                                             drop_last=True, num_workers=args.workers,
                                             persistent_workers=args.workers > 0,
                                             pin_memory=device.type == "cuda")
    times, step, began = [], 0, time.time()
    with open(os.path.join(args.out, "log.jsonl"), "w") as log:
        while step < steps:
            for views, _ in loader:
                set_step(step)
                model.step, model.progress = step, step / steps
                start = time.perf_counter()
                views = views if isinstance(views, list) else [views]
                loss = model.loss(*(x.to(device, non_blocking=True) for x in views))
                optim.zero_grad()
                loss.backward()
                if hasattr(model, "after_backward"):
                    model.after_backward()
                clip_gradients(trained, clip, clip_kind)
                optim.step()
                if hasattr(model, "after_step"):
                    model.after_step()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
                step += 1
                if step % 25 == 0 or step == steps:
                    log.write(json.dumps({"step": step, "loss": loss.item(),
                                          "step_s": times[-1]}) + "\n")
                    log.flush()
                    print(f"step {step}/{steps} loss {loss.item():.4f} "
                          f"{statistics.median(times[-25:]):.3f} s/step", flush=True)
                if step == steps or (args.max_seconds and time.time() - began > args.max_seconds):
                    steps = step
                    break
    model.eval().cpu()
    vit = hasattr(model, "exported")
    if vit:  # timm's VisionTransformer keys
        weights = {k: v.detach().contiguous().clone() for k, v in model.exported().items()}
    else:
        weights = timm_state_dict(model.backbone, 8 if method == "moco_v2" else 0)
    save_file(weights, os.path.join(args.out, "backbone.safetensors"))
    keys = "timm vision_transformer" if vit else "timm/torchvision resnet"
    with open(os.path.join(args.out, "model.json"), "w") as f:
        json.dump({"keys": keys, "model": config["model"], "method": method,
                   "steps": steps, "batch_size": batch,
                   "median_step_s": statistics.median(times), "device": str(device)}, f,
                  indent=1)
    print(json.dumps({"method": method, "steps": steps,
                      "median_step_s": round(statistics.median(times), 4)}))


if __name__ == "__main__":
    main()
