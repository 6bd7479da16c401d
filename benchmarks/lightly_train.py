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
JAX. ``--run`` is a project run directory: its ``config.json`` gives the method (``byol`` or
``moco_v2``, the two lightly's CIFAR-10 benchmark has, or ``simmim``: class ``SimMIM``), the
batch size, the number of steps
(``total_steps`` as the run's trainer computed it, or ``--steps``), the ResNet's width and the
views. The model, loss and optimizer are those of lightly's ``cifar10_benchmark.py``
(``BYOLModel`` / ``MocoModel``): lightly's ``ResNetGenerator('resnet-18')`` (the CIFAR stem;
8 split BatchNorm groups with shuffled keys for MoCo), lightly's heads with the run's sizes,
``NegativeCosineSimilarity`` / ``NTXentLoss`` with a memory bank, momentum 0.99, SGD with
momentum 0.9, LR 6e-2 x B/128, weight decay 5e-4 and a cosine to zero, here stepped per step
(the benchmark steps it per epoch) to match the project's schedule. The views are lightly's
``SimCLRViewTransform`` with the run's ``aug.view1`` / ``aug.view2`` values. SimMIM has no
lightly CIFAR-10 recipe: lightly's SimMIM example (class ``SimMIM`` below) trains with the run's
view (crop and flip), AdamW, warm-up + cosine schedule and gradient clipping.

On a machine where torch sees a GPU it trains there (``--device auto``; ``--workers`` data
loader processes, ``--max_seconds`` stops early and records the steps reached).

Writes ``OUT/backbone.safetensors`` (timm's ``VisionTransformer`` keys for SimMIM; else
timm/torchvision ``resnet`` key names, running statistics
averaged over the split groups), ``OUT/model.json`` (the run's model config: the project's ResNet
of the same shape) and ``OUT/log.jsonl`` (loss and seconds per step, data loading excluded).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import statistics
import sys
import time

import torch
import torchvision
import torchvision.transforms as T
from lightly.loss import NegativeCosineSimilarity, NTXentLoss
from lightly.models import ResNetGenerator, utils
from lightly.models.modules import heads
from lightly.transforms import SimCLRViewTransform
from lightly.transforms.multi_view_transform import MultiViewTransform
from lightly.transforms.utils import IMAGENET_NORMALIZE
from safetensors.torch import save_file
from torch import nn


def view_transform(view: dict) -> SimCLRViewTransform:
    """lightly's SimCLR view with the project view's values (crop, jitter, grey, blur, flip)."""
    if view.get("solarize_p", 0.0) or view.get("blur_p", 0.0):
        sys.exit("lightly_train.py: views with blur or solarize are not mapped (use a run whose "
                 "views have blur_p=0 and solarize_p=0, as the CIFAR-10 presets)")
    return SimCLRViewTransform(
        input_size=view["size"], cj_prob=view["color_jitter_p"], cj_strength=view["color_jitter"],
        cj_bright=view["brightness"], cj_contrast=view["contrast"], cj_sat=view["saturation"],
        cj_hue=view["hue"], min_scale=view["crop_scale"][0], random_gray_scale=view["grayscale_p"],
        gaussian_blur=0.0, hf_prob=0.5 if view["flip"] else 0.0)


def simmim_transform(view: dict) -> T.Compose:
    """SimMIM's views: a random resized crop and a flip, normalised (no colour)."""
    return T.Compose([
        T.RandomResizedCrop(view["size"], scale=tuple(view["crop_scale"]),
                            ratio=tuple(view["crop_ratio"])),
        T.RandomHorizontalFlip(0.5 if view["flip"] else 0.0), T.ToTensor(),
        T.Normalize(IMAGENET_NORMALIZE["mean"], IMAGENET_NORMALIZE["std"])])


def adamw(model: nn.Module, o: dict, batch: int, steps: int, steps_per_epoch: int):
    """The run's AdamW (weight decay on every parameter, as torch optimizers over
    ``model.parameters()``) and its LR: linear warm-up, then a cosine to ``end_lr_factor``."""
    peak = o["base_lr"] * batch / 256
    warmup = round(o["warmup_epochs"] * steps_per_epoch)
    optim = torch.optim.AdamW(model.trained(), lr=peak, betas=(o["b1"], o["b2"]),
                              weight_decay=o["weight_decay"])

    def lr_at(step: int) -> float:
        if step < warmup:
            return peak * step / warmup
        t = (step - warmup) / max(1, steps - warmup)
        end = peak * o["end_lr_factor"]
        return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * t))

    return optim, lr_at


def backbone(width: float, num_splits: int) -> nn.Module:
    """lightly's CIFAR ResNet-18 (3x3 stem, no max-pool), pooled features out (its classifier
    replaced by the identity: its forward pools the last stage and flattens)."""
    resnet = ResNetGenerator("resnet-18", width=width, num_splits=num_splits)
    resnet.linear = nn.Identity()
    return resnet


class BYOL(nn.Module):
    """lightly's ``BYOLModel``: 0.5 (-cos(p0, z1) - cos(p1, z0)), momentum 0.99."""

    def __init__(self, cfg: dict, width: float, dim: int):
        super().__init__()
        self.backbone = backbone(width, 0)
        self.projection_head = heads.BYOLProjectionHead(dim, cfg["proj_hidden_dim"],
                                                        cfg["proj_out_dim"])
        self.prediction_head = heads.BYOLPredictionHead(cfg["proj_out_dim"],
                                                        cfg["pred_hidden_dim"],
                                                        cfg["proj_out_dim"])
        self.backbone_momentum = copy.deepcopy(self.backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        utils.deactivate_requires_grad(self.backbone_momentum)
        utils.deactivate_requires_grad(self.projection_head_momentum)
        self.criterion = NegativeCosineSimilarity()

    def trained(self) -> list[nn.Parameter]:
        return [*self.backbone.parameters(), *self.projection_head.parameters(),
                *self.prediction_head.parameters()]

    def loss(self, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        utils.update_momentum(self.backbone, self.backbone_momentum, m=0.99)
        utils.update_momentum(self.projection_head, self.projection_head_momentum, m=0.99)
        p0, p1 = (self.prediction_head(self.projection_head(self.backbone(x)))
                  for x in (x0, x1))
        with torch.no_grad():
            z0, z1 = (self.projection_head_momentum(self.backbone_momentum(x)) for x in (x0, x1))
        return 0.5 * (self.criterion(p0, z1) + self.criterion(p1, z0))


class MoCo(nn.Module):
    """lightly's ``MocoModel``: split BatchNorm (8 groups), shuffled keys, symmetric NT-Xent
    against a memory bank, momentum 0.99."""

    def __init__(self, cfg: dict, width: float, dim: int):
        super().__init__()
        self.backbone = backbone(width, 8)
        self.projection_head = heads.MoCoProjectionHead(dim, cfg["proj_hidden_dim"],
                                                        cfg["proj_out_dim"])
        self.backbone_momentum = copy.deepcopy(self.backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        utils.deactivate_requires_grad(self.backbone_momentum)
        utils.deactivate_requires_grad(self.projection_head_momentum)
        self.criterion = NTXentLoss(temperature=cfg["temperature"],
                                    memory_bank_size=(cfg["queue_size"], cfg["proj_out_dim"]))

    def trained(self) -> list[nn.Parameter]:
        return [*self.backbone.parameters(), *self.projection_head.parameters()]

    def _pair(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, shuffle = utils.batch_shuffle(k)
        q = self.projection_head(self.backbone(q))
        with torch.no_grad():
            k = self.projection_head_momentum(self.backbone_momentum(k))
        return q, utils.batch_unshuffle(k, shuffle)

    def loss(self, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        utils.update_momentum(self.backbone, self.backbone_momentum, 0.99)
        utils.update_momentum(self.projection_head, self.projection_head_momentum, 0.99)
        return 0.5 * (self.criterion(*self._pair(x0, x1)) + self.criterion(*self._pair(x1, x0)))


class SimMIM(nn.Module):
    """lightly's SimMIM example (``MaskedVisionTransformerTIMM`` over timm's
    ``VisionTransformer``, every token through the encoder with masked ones replaced by the mask
    token, a linear decoder to the pixels of each patch, ``L1Loss`` on masked patches of the
    normalised image) with the run's ViT size, drop path and masks: a share ``mask_ratio`` of
    the ``mask_patch_size`` squares masked at random, each covering the model patches under it
    (lightly's example masks single patches; the run's masks keep the two tasks equal). timm's
    ViT here has a cls token, the fixed sin-cos position embedding, the run's layer scale, no
    relative position bias and lightly's MAE-style initial weights: run the project's side with
    the same (``--set model.pos_embed=sincos --set model.rel_pos_bias=False --set
    model.init_scheme=mae``)."""

    def __init__(self, config: dict):
        super().__init__()
        from lightly.models.modules import MaskedVisionTransformerTIMM
        from timm.models.vision_transformer import VisionTransformer

        m, size = config["model"], config["aug"]["view1"]["size"]
        found = re.fullmatch(r"vit_([a-z]+)(\d+)", m["name"])
        if not found or found[1] not in VIT_SIZES:
            sys.exit(f"lightly_train.py: model {m['name']!r} is not a ViT of {sorted(VIT_SIZES)}")
        (dim, depth, heads), self.patch = VIT_SIZES[found[1]], int(found[2])
        vit = VisionTransformer(img_size=size, patch_size=self.patch, embed_dim=dim,
                                depth=m.get("depth") or depth, num_heads=heads,
                                mlp_ratio=m.get("mlp_ratio", 4.0), num_classes=0,
                                drop_path_rate=m.get("drop_path_rate", 0.0),
                                init_values=m.get("layer_scale_init"))
        self.backbone = MaskedVisionTransformerTIMM(vit=vit, pos_embed_initialization="sincos")
        self.decoder = nn.Linear(dim, self.patch**2 * 3)
        self.criterion = nn.L1Loss()
        c = config["simmim"]
        self.grid, self.scale = size // self.patch, c["mask_patch_size"] // self.patch
        self.num_masked = math.ceil(c["mask_ratio"] * (size // c["mask_patch_size"]) ** 2)

    def trained(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def masks(self, batch: int, device: torch.device) -> torch.Tensor:
        """``[batch, 1 + N]`` bools (True: masked); the cls token is never masked."""
        side = self.grid // self.scale
        order = torch.rand(batch, side * side, device=device).argsort(1)
        coarse = (order < self.num_masked).view(batch, side, side)  # a random subset each
        fine = coarse.repeat_interleave(self.scale, 1).repeat_interleave(self.scale, 2)
        return torch.cat([torch.zeros(batch, 1, dtype=torch.bool, device=device),
                          fine.flatten(1)], 1)

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        mask = self.masks(x.shape[0], x.device)
        tokens = self.backbone.encode(x, mask=mask)
        pred = self.decoder(tokens[mask])  # [masked tokens, p * p * 3]
        target = utils.patchify(x, self.patch)[mask[:, 1:]]
        return self.criterion(pred, target)


# (dim, depth, heads) of the project's ViT names (ssl_jax.models.vit.VIT_SIZES, which this
# JAX-free process cannot import).
VIT_SIZES = {"ti": (192, 12, 3), "s": (384, 12, 6), "b": (768, 12, 12)}
MODELS = {"byol": BYOL, "moco_v2": MoCo, "simmim": SimMIM}


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
    if method == "simmim":
        model = SimMIM(config).to(device)
        transform = simmim_transform(config["aug"]["view1"])
        optim, lr_at = adamw(model, config["optim"], batch, steps, steps_per_epoch)
        clip = config["optim"]["grad_clip_norm"]
    else:
        width = config["model"].get("width_multiplier", 1.0)
        model = MODELS[method](config[method], width, int(512 * width)).to(device)
        transform = MultiViewTransform([view_transform(config["aug"]["view1"]),
                                        view_transform(config["aug"]["view2"])])
        lr = 6e-2 * batch / 128
        optim = torch.optim.SGD(model.trained(), lr=lr, momentum=0.9, weight_decay=5e-4)

        def lr_at(step: int) -> float:
            return lr * 0.5 * (1 + math.cos(math.pi * step / steps))

        clip = 0.0  # lightly's benchmark does not clip
    data = torchvision.datasets.ImageFolder(os.path.join(args.data_root, "train"), transform)
    loader = torch.utils.data.DataLoader(data, batch_size=batch, shuffle=True, drop_last=True,
                                         num_workers=args.workers,
                                         persistent_workers=args.workers > 0,
                                         pin_memory=device.type == "cuda")
    times, step, began = [], 0, time.time()
    with open(os.path.join(args.out, "log.jsonl"), "w") as log:
        while step < steps:
            for views, _ in loader:
                for group in optim.param_groups:
                    group["lr"] = lr_at(step)
                start = time.perf_counter()
                views = views if isinstance(views, list) else [views]
                loss = model.loss(*(x.to(device, non_blocking=True) for x in views))
                optim.zero_grad()
                loss.backward()
                if clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.trained(), clip)
                optim.step()
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
    if method == "simmim":  # timm's VisionTransformer keys
        weights = {k: v.detach().contiguous().clone()
                   for k, v in model.backbone.vit.state_dict().items()}
        weights["mask_token"] = model.backbone.mask_token.detach().clone()
    else:
        weights = timm_state_dict(model.backbone, 8 if method == "moco_v2" else 0)
    save_file(weights, os.path.join(args.out, "backbone.safetensors"))
    keys = "timm vision_transformer" if method == "simmim" else "timm/torchvision resnet"
    with open(os.path.join(args.out, "model.json"), "w") as f:
        json.dump({"keys": keys, "model": config["model"], "method": method,
                   "steps": steps, "batch_size": batch,
                   "median_step_s": statistics.median(times), "device": str(device)}, f,
                  indent=1)
    print(json.dumps({"method": method, "steps": steps,
                      "median_step_s": round(statistics.median(times), 4)}))


if __name__ == "__main__":
    main()
