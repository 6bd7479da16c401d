"""The PyTorch side of ``benchmarks/vs_torch.py``: the same method's train step written with the
peers' libraries (timm models, lightly losses, heads and LARS), driven over a pipe.

Runs under the peers' Python (``bash ../shared/peers/setup.sh /tmp/peers``) and never imports
JAX. Protocol, one JSON object per line: the first line on stdin is the spec that vs_torch.py
derives from the project's config; this process builds an eager step and a ``torch.compile``-d
one (same initial weights; ``"modes"`` in the spec may name only one), answers ``{"ready": ...}``,
then answers every ``{"mode": "eager"|"compile", "steps": K}`` with ``{"times": [seconds per
step], "peak_rss_mb": this process's high-water mark so far}``; ``{"quit": true}`` ends it. A
spec with ``"features": true`` times the evaluation job's work instead: the backbone's forward
in eval mode under ``torch.inference_mode`` on the normalised batch, no loss, no update.

A step is what the project's jitted step does: batched augmentation of uint8 images on the
device (here: the CPU) with per-example random parameters, the forward pass(es), the loss, the
backward pass and the optimizer update (plus the method's EMA teacher / centre). Augmentation is
written as batched tensor ops (kornia-style: crop and flip as one ``affine_grid`` +
``grid_sample``, colour jitter, grayscale, separable Gaussian blur, solarize), the form a
GPU-resident torch pipeline takes, so that both sides do the same work inside the timed step.
"""

from __future__ import annotations

import json
import os
import sys
import time
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.memory import peak_rss_mb  # noqa: E402
from benchmarks.torch_augment import MEAN, STD, augment  # noqa: E402
from ssl_jax import allocator  # noqa: E402  (only os: no JAX in the peers' environment)


# --- Models ----------------------------------------------------------------------------------
def vit(spec: dict, drop_path: float | None = None, **kw):
    import timm.models.vision_transformer as tv

    m = spec["model"]
    return tv.VisionTransformer(
        img_size=spec["image_size"], patch_size=m["patch"], embed_dim=m["dim"], depth=m["depth"],
        num_heads=m["heads"], mlp_ratio=m["mlp_ratio"], num_classes=0,
        drop_path_rate=m["drop_path"] if drop_path is None else drop_path, **kw)


def sincos_2d(dim: int, grid: int) -> torch.Tensor:
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")

    def embed(pos):
        angles = pos.reshape(-1, 1).double() * omega
        return torch.cat([angles.sin(), angles.cos()], 1)

    return torch.cat([embed(cols), embed(rows)], 1).float()[None]


class MAE(nn.Module):
    """MAE as its reference code (models_mae.py): timm PatchEmbed and Blocks, random masking by
    argsort of noise, a light decoder, MSE on masked patches of per-patch normalised pixels."""

    def __init__(self, spec: dict):
        from timm.models.vision_transformer import Block, PatchEmbed

        super().__init__()
        m, c = spec["model"], spec["mae"]
        self.patch, self.ratio, self.norm_pix = m["patch"], c["mask_ratio"], c["norm_pix"]
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.patch_embed = PatchEmbed(spec["image_size"], m["patch"], 3, m["dim"])
        grid = spec["image_size"] // m["patch"]
        self.cls_token = nn.Parameter(torch.zeros(1, 1, m["dim"]))
        self.register_buffer("pos", sincos_2d(m["dim"], grid))
        self.blocks = nn.ModuleList(Block(m["dim"], m["heads"], m["mlp_ratio"], qkv_bias=True,
                                          norm_layer=norm) for _ in range(m["depth"]))
        self.norm = norm(m["dim"])
        d = c["decoder_dim"]
        self.decoder_embed = nn.Linear(m["dim"], d)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
        self.register_buffer("dec_pos", sincos_2d(d, grid))
        self.decoder_blocks = nn.ModuleList(Block(d, c["decoder_heads"], 4.0, qkv_bias=True,
                                                  norm_layer=norm)
                                            for _ in range(c["decoder_depth"]))
        self.decoder_norm = norm(d)
        self.decoder_pred = nn.Linear(d, m["patch"] ** 2 * 3)

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(imgs) + self.pos
        n, length, dim = x.shape
        keep = int(length * (1 - self.ratio))
        ids_shuffle = torch.argsort(torch.rand(n, length), dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        x = torch.gather(x, 1, ids_shuffle[:, :keep, None].expand(-1, -1, dim))
        mask = torch.ones(n, length)
        mask[:, :keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        x = torch.cat([self.cls_token.expand(n, -1, -1), x], 1)
        for blk in self.blocks:
            x = blk(x)
        x = self.decoder_embed(self.norm(x))
        fill = self.mask_token.expand(n, length - keep, -1)
        y = torch.cat([x[:, 1:], fill], 1)
        y = torch.gather(y, 1, ids_restore[:, :, None].expand(-1, -1, y.shape[2])) + self.dec_pos
        y = torch.cat([x[:, :1], y], 1)
        for blk in self.decoder_blocks:
            y = blk(y)
        pred = self.decoder_pred(self.decoder_norm(y))[:, 1:]
        p = self.patch
        t = imgs.reshape(n, 3, imgs.shape[2] // p, p, imgs.shape[3] // p, p)
        target = torch.einsum("nchpwq->nhwpqc", t).reshape(n, length, p * p * 3)
        if self.norm_pix:
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        loss = ((pred - target) ** 2).mean(-1)
        return (loss * mask).sum() / mask.sum()


class DVAEEncoder(nn.Module):
    """The project's dVAE encoder (ssl_jax/models/dvae.py) in torch: BEiT's frozen tokenizer."""

    def __init__(self, vocab: int, hidden: int, downsample: int, res_blocks: int):
        super().__init__()
        widths = [hidden * 2**i for i in range(downsample + 1)]
        layers: list[nn.Module] = [nn.Conv2d(3, widths[0], 3, padding=1)]
        for i, w in enumerate(widths):
            layers += [ResBlock(w) for _ in range(res_blocks)]
            if i < downsample:
                layers.append(nn.Conv2d(w, widths[i + 1], 3, stride=2, padding=1))
        layers += [nn.ReLU(), nn.Conv2d(widths[-1], vocab, 1)]
        gain = 1.0 / max((downsample + 1) * res_blocks, 1) ** 2  # DALL-E's post-gain
        for layer in layers:
            if isinstance(layer, ResBlock):
                layer.gain = gain
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).flatten(2).argmax(1)  # [B, grid * grid], row-major


class ResBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        h = max(width // 4, 1)
        convs = [nn.Conv2d(width, h, 3, padding=1), nn.Conv2d(h, h, 3, padding=1),
                 nn.Conv2d(h, h, 3, padding=1), nn.Conv2d(h, width, 1)]
        self.f = nn.Sequential(*(m for c in convs for m in (nn.ReLU(), c)))
        self.gain = 1.0

    def forward(self, x):
        return x + self.gain * self.f(x)


class BEiT(nn.Module):
    """timm's Beit (shared relative position bias, layer scale, no absolute position embedding)
    with a mask token and a linear head over the visual tokens; CE at masked positions."""

    def __init__(self, spec: dict):
        from timm.models.beit import Beit

        super().__init__()
        m, c = spec["model"], spec["beit"]
        self.beit = Beit(img_size=spec["image_size"], patch_size=m["patch"], embed_dim=m["dim"],
                         depth=m["depth"], num_heads=m["heads"], mlp_ratio=m["mlp_ratio"],
                         num_classes=0, use_abs_pos_emb=False, use_shared_rel_pos_bias=True,
                         init_values=m["layer_scale"], drop_path_rate=m["drop_path"])
        self.mask_token = nn.Parameter(torch.zeros(1, 1, m["dim"]))
        self.head = nn.Linear(m["dim"], c["vocab"])
        self.num_masked = c["num_masked"]
        self.tokenizer = DVAEEncoder(c["vocab"], c["tok_hidden"], c["tok_downsample"],
                                     c["tok_res_blocks"]).requires_grad_(False)

    def forward(self, view: torch.Tensor, tok_view: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            targets = self.tokenizer(tok_view)
        b = self.beit
        x = b.patch_embed(view)
        n, length, _ = x.shape
        # BEiT's sampler draws blocks on the host; here the same count of random patches.
        mask = torch.argsort(torch.rand(n, length), 1) < self.num_masked
        w = mask.unsqueeze(-1).to(x.dtype)
        x = x * (1 - w) + self.mask_token * w
        x = torch.cat((b.cls_token.expand(n, -1, -1), x), 1)
        bias = b.rel_pos_bias()
        for blk in b.blocks:
            x = blk(x, shared_rel_pos_bias=bias)
        logits = self.head(b.norm(x)[:, 1:])
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                             reduction="none")
        mask = mask.reshape(-1).to(ce.dtype)
        return (ce * mask).sum() / mask.sum()


def cifar_resnet18(width: float):
    import timm

    net = timm.create_model("resnet18", num_classes=0)
    if width != 1.0:  # a narrower ResNet-18 (the project's width_multiplier)
        from timm.models.resnet import BasicBlock, ResNet

        net = ResNet(BasicBlock, [2, 2, 2, 2], num_classes=0, stem_width=round(64 * width),
                     channels=tuple(round(c * width) for c in (64, 128, 256, 512)))
    net.conv1 = nn.Conv2d(3, net.conv1.out_channels, 3, 1, 1, bias=False)
    net.maxpool = nn.Identity()
    return net


# --- The methods: (modules to train, loss closure, optimizer, after-step hook) ----------------
def build(spec: dict):
    method, batch = spec["method"], spec["batch_size"]
    views = spec["views"]
    if method == "simclr":
        from lightly.loss import NTXentLoss
        from lightly.models.modules.heads import SimCLRProjectionHead
        from lightly.utils.lars import LARS

        c = spec["simclr"]
        net = nn.Sequential(cifar_resnet18(spec["model"]["width"]))
        feats = net[0].num_features
        head = SimCLRProjectionHead(feats, c["hidden"], c["out"], num_layers=c["layers"])
        model = nn.ModuleDict({"net": net, "head": head})
        criterion = NTXentLoss(temperature=c["temperature"])

        def loss_fn(images):
            x0, x1 = augment(images, views[0])[0], augment(images, views[1])[0]
            z = model["head"](model["net"](torch.cat([x0, x1])))
            return criterion(z[:batch], z[batch:])

        opt = LARS(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-6)
        return model, loss_fn, opt, lambda: None

    if method == "mae":
        model = MAE(spec)

        def loss_fn(images):
            return model(augment(images, views[0])[0])

    elif method == "beit":
        model = BEiT(spec)
        tok_size = spec["beit"]["tok_size"]

        def loss_fn(images):  # the same crop, flip and jitter at two sizes, as the project's
            return model(*augment(images, views[0], (views[0]["size"], tok_size)))

    elif method == "dino":
        from lightly.loss import DINOLoss
        from lightly.models.modules.heads import DINOProjectionHead
        from lightly.models.utils import update_momentum

        c = spec["dino"]

        def network(drop_path=None):
            backbone = vit(spec, drop_path, dynamic_img_size=True)
            head = DINOProjectionHead(spec["model"]["dim"], c["hidden"], c["bottleneck"], c["out"],
                                      batch_norm=False, freeze_last_layer=1)
            return nn.Sequential(backbone, head)

        student = network()
        teacher = network(0.0).requires_grad_(False)
        teacher.load_state_dict(student.state_dict())
        model = nn.ModuleDict({"student": student, "teacher": teacher})
        criterion = DINOLoss(output_dim=c["out"], warmup_teacher_temp=c["teacher_temp"],
                             teacher_temp=c["teacher_temp"], warmup_teacher_temp_epochs=0,
                             student_temp=c["student_temp"], center_momentum=c["center_momentum"])
        model.criterion = criterion

        def loss_fn(images):
            g = [augment(images, views[i % 2])[0] for i in range(c["global_crops"])]
            loc = [augment(images, views[2])[0] for _ in range(c["local_crops"])]
            with torch.no_grad():
                t_out = model["teacher"](torch.cat(g)).chunk(len(g))
            s_out = list(model["student"](torch.cat(g)).chunk(len(g)))
            if loc:
                s_out += list(model["student"](torch.cat(loc)).chunk(len(loc)))
            return criterion(list(t_out), s_out)

        def after_step():
            update_momentum(model["student"], model["teacher"], m=0.996)

        opt = torch.optim.AdamW(student.parameters(), lr=1e-4, weight_decay=0.04)
        return model, loss_fn, opt, after_step
    else:
        raise ValueError(f"no torch peer for method {method!r}")
    o = spec["optim"]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(o["b1"], o["b2"]),
                            weight_decay=o["weight_decay"])
    return model, loss_fn, opt, lambda: None


def features_step(spec: dict, compiled: bool):
    """The evaluation job's feature extraction: normalise the uint8 batch, forward in eval mode."""
    torch.manual_seed(0)
    net = cifar_resnet18(spec["model"]["width"]).eval()
    forward = torch.compile(net) if compiled else net

    @torch.inference_mode()
    def step(images):
        x = images.permute(0, 3, 1, 2).float().div_(255)
        return forward((x - MEAN) / STD)

    return step


def make_step(spec: dict, compiled: bool):
    if spec.get("features"):
        return features_step(spec, compiled)
    torch.manual_seed(0)
    model, loss_fn, opt, after_step = build(spec)
    model.train()
    forward = torch.compile(loss_fn) if compiled else loss_fn
    o = spec["optim"]
    params = [p for p in model.parameters() if p.requires_grad]
    dino = spec["method"] == "dino"

    autocast = spec.get("autocast_bf16", False)

    def step(images):
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = forward(images)
        loss.backward()
        if dino:
            model["student"][1].cancel_last_layer_gradients(0)  # frozen in the first epoch
        if o["clip"] > 0:
            grads = [p.grad for p in params if p.grad is not None]
            if o["clip_kind"] == "per_parameter":  # DINO's clip_gradients
                norms = torch._foreach_norm(grads)
                torch._foreach_mul_(grads, [(o["clip"] / (n + 1e-6)).clamp(max=1) for n in norms])
            else:
                torch.nn.utils.clip_grad_norm_(params, o["clip"])
        opt.step()
        after_step()
        return loss

    return step


def main() -> None:
    spec = json.loads(sys.stdin.readline())
    torch.set_num_threads(spec.get("threads", 2))
    torch.set_flush_denormal(spec.get("flush_denormal", True))
    size = spec["data_image_size"]
    images = torch.randint(0, 256, (spec["batch_size"], size, size, 3), dtype=torch.uint8)
    steps = {mode: make_step(spec, mode == "compile")
             for mode in spec.get("modes", ("eager", "compile"))}
    ready = {}
    for mode, step in steps.items():
        start = time.perf_counter()
        step(images)  # torch.compile compiles here
        ready[f"first_step_s_{mode}"] = time.perf_counter() - start
        for _ in range(spec.get("warmup", 1)):
            step(images)
    ready["threads"] = torch.get_num_threads()
    ready["cores"] = len(os.sched_getaffinity(0))
    ready["torch"] = torch.__version__
    ready["allocator_torch"] = allocator.active()
    print(json.dumps({"ready": ready}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd.get("quit"):
            break
        step, times = steps[cmd["mode"]], []
        for _ in range(cmd["steps"]):
            start = time.perf_counter()
            step(images)
            times.append(time.perf_counter() - start)
        print(json.dumps({"times": times, "peak_rss_mb": peak_rss_mb()}), flush=True)


if __name__ == "__main__":
    main()
