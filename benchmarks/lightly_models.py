r"""lightly's side of the accuracy comparison (``lightly_train.py``): each class is one method built
from lightly's pieces with a project run's sizes, exposing ``trained()`` (the parameters the
optimizer updates) and ``loss(*views)``, built as ``Class(run_config, steps_per_epoch)``; the
loop sets ``step`` and ``progress`` (the share of training done) before each step for the
schedules, and calls ``after_backward()`` and ``after_step()`` where a class has them;
``exported()`` gives a ViT's encoder weights. The ResNet methods follow lightly's
``cifar10_benchmark.py``; MoCo v3, SimMIM and iBOT, which that benchmark lacks, follow lightly's
examples (``examples/pytorch``) and the papers where the examples simplify (said in each class).
Runs under the peers' Python only.
"""

from __future__ import annotations

import copy
import math
import re
import sys

import torch
from lightly.loss import DINOLoss, IBOTPatchLoss, NegativeCosineSimilarity, NTXentLoss
from lightly.models import ResNetGenerator, utils
from lightly.models.modules import MaskedVisionTransformerTIMM, heads
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.nn import functional as F

# (dim, depth, heads) of the project's ViT names (ssl_jax.models.vit.VIT_SIZES, which this
# JAX-free process cannot import).
VIT_SIZES = {"ti": (192, 12, 3), "s": (384, 12, 6), "b": (768, 12, 12)}


def cosine_momentum(base: float, progress: float) -> float:
    """BYOL's / DINO's EMA momentum: ``1 - (1 - base) (cos(pi t) + 1) / 2``, ``t`` in [0, 1]."""
    return 1 - (1 - base) * (math.cos(math.pi * progress) + 1) / 2


def timm_vit(m: dict, size: int, dynamic: bool = False) -> tuple[VisionTransformer, int]:
    """timm's ``VisionTransformer`` of the project's ViT ``m`` (name ``vit_<size><patch>``,
    ``depth``, ``mlp_ratio``, drop path, layer scale); ``dynamic`` for multi-crop (position
    embeddings interpolated to smaller crops). Returns ``(vit, patch)``."""
    found = re.fullmatch(r"vit_([a-z]+)(\d+)", m["name"])
    if not found or found[1] not in VIT_SIZES:
        sys.exit(f"lightly_train.py: model {m['name']!r} is not a ViT of {sorted(VIT_SIZES)}")
    (dim, depth, num_heads), patch = VIT_SIZES[found[1]], int(found[2])
    vit = VisionTransformer(img_size=size, patch_size=patch, embed_dim=dim,
                            depth=m.get("depth") or depth, num_heads=num_heads,
                            mlp_ratio=m.get("mlp_ratio", 4.0), num_classes=0,
                            drop_path_rate=m.get("drop_path_rate", 0.0),
                            init_values=m.get("layer_scale_init"), dynamic_img_size=dynamic)
    return vit, patch


def frozen_copy(module: nn.Module, twin: nn.Module | None = None) -> nn.Module:
    """A momentum (EMA) copy of ``module``: no gradients, eval mode (no drop path in a teacher).
    ``twin``: a fresh module of the same shape to load it into (weight-normed layers cannot be
    deep-copied)."""
    if twin is None:
        twin = copy.deepcopy(module)
    else:
        twin.load_state_dict(module.state_dict())
    utils.deactivate_requires_grad(twin)
    return twin.eval()


def backbone(config: dict, num_splits: int) -> tuple[nn.Module, int]:
    """lightly's CIFAR ResNet-18 (3x3 stem, no max-pool) at the run's ``width_multiplier``,
    pooled features out (its classifier replaced by the identity: its forward pools the last
    stage and flattens). Returns ``(resnet, feature dimension)``."""
    width = config["model"].get("width_multiplier", 1.0)
    resnet = ResNetGenerator("resnet-18", width=width, num_splits=num_splits)
    resnet.linear = nn.Identity()
    return resnet, int(512 * width)


class BYOL(nn.Module):
    """lightly's ``BYOLModel``: 0.5 (-cos(p0, z1) - cos(p1, z0)), momentum 0.99."""

    def __init__(self, config: dict, steps_per_epoch: int):
        super().__init__()
        cfg = config["byol"]
        self.backbone, dim = backbone(config, 0)
        self.projection_head = heads.BYOLProjectionHead(dim, cfg["proj_hidden_dim"],
                                                        cfg["proj_out_dim"])
        self.prediction_head = heads.BYOLPredictionHead(cfg["proj_out_dim"],
                                                        cfg["pred_hidden_dim"],
                                                        cfg["proj_out_dim"])
        self.backbone_momentum = frozen_copy(self.backbone).train()  # BN batch statistics
        self.projection_head_momentum = frozen_copy(self.projection_head).train()
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

    def __init__(self, config: dict, steps_per_epoch: int):
        super().__init__()
        cfg = config["moco_v2"]
        self.backbone, dim = backbone(config, 8)
        self.projection_head = heads.MoCoProjectionHead(dim, cfg["proj_hidden_dim"],
                                                        cfg["proj_out_dim"])
        self.backbone_momentum = frozen_copy(self.backbone).train()  # BN batch statistics
        self.projection_head_momentum = frozen_copy(self.projection_head).train()
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

    def __init__(self, config: dict, steps_per_epoch: int):
        super().__init__()
        size = config["aug"]["view1"]["size"]
        vit, self.patch = timm_vit(config["model"], size)
        dim = vit.embed_dim
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

    def exported(self) -> dict[str, torch.Tensor]:
        """The encoder: timm ``VisionTransformer`` keys and the mask token."""
        weights = dict(self.backbone.vit.state_dict())
        weights["mask_token"] = self.backbone.mask_token
        return weights


class MoCoV3(nn.Module):
    """MoCo v3 on lightly's pieces (lightly's CIFAR-10 benchmark has no MoCo v3): its CIFAR
    ResNet-18, ``MoCoProjectionHead`` with BatchNorm on every layer (the run's
    ``proj_layers``), ``BYOLPredictionHead`` (no BatchNorm on the output, as the official
    predictor), a momentum encoder following a cosine from the run's ``momentum`` to 1, and the
    official loss (lightly has none for v3): ``ctr(q1, k2) + ctr(q2, k1)`` with
    ``ctr(q, k) = 2T CE(q k^T / T, diagonal)``, negatives the other images of the batch."""

    def __init__(self, config: dict, steps_per_epoch: int):
        super().__init__()
        cfg = config["moco_v3"]
        self.backbone, dim = backbone(config, 0)
        out = cfg["proj_out_dim"]
        self.projection_head = heads.MoCoProjectionHead(dim, cfg["proj_hidden_dim"], out,
                                                        num_layers=cfg["proj_layers"],
                                                        batch_norm=True)
        self.prediction_head = heads.BYOLPredictionHead(out, cfg["pred_hidden_dim"], out)
        self.backbone_momentum = frozen_copy(self.backbone).train()  # BN batch statistics
        self.projection_head_momentum = frozen_copy(self.projection_head).train()
        self.temperature, self.base_momentum = cfg["temperature"], cfg["momentum"]
        self.cosine = cfg.get("momentum_cosine", True)
        self.progress = 0.0

    def trained(self) -> list[nn.Parameter]:
        return [*self.backbone.parameters(), *self.projection_head.parameters(),
                *self.prediction_head.parameters()]

    def _ctr(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        logits = F.normalize(q, dim=1) @ F.normalize(k, dim=1).T / self.temperature
        labels = torch.arange(q.shape[0], device=q.device)
        return 2 * self.temperature * F.cross_entropy(logits, labels)

    def loss(self, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        m = (cosine_momentum(self.base_momentum, self.progress) if self.cosine
             else self.base_momentum)
        utils.update_momentum(self.backbone, self.backbone_momentum, m)
        utils.update_momentum(self.projection_head, self.projection_head_momentum, m)
        q0, q1 = (self.prediction_head(self.projection_head(self.backbone(x))) for x in (x0, x1))
        with torch.no_grad():
            k0, k1 = (self.projection_head_momentum(self.backbone_momentum(x)) for x in (x0, x1))
        return self._ctr(q0, k1) + self._ctr(q1, k0)


class IBOT(nn.Module):
    """lightly's iBOT example (``MaskedVisionTransformerTIMM`` student and EMA teacher,
    ``DINOProjectionHead``, ``DINOLoss`` on the cls tokens of every crop against the teacher's
    global crops, ``IBOTPatchLoss`` on the masked patches of the global crops, block masks from
    ``random_block_mask``) with the run's ViT, heads, temperatures and their warm-up, centre
    momenta, masking (probability, ratio range, block size, aspect), loss weights, teacher
    momentum (cosine to 1) and last-layer freezing. Where the example simplifies, this follows
    the paper and the run: the teacher starts as a copy of the student (the example draws its
    head anew), the patch head is shared or not as the run's ``shared_head`` says."""

    def __init__(self, config: dict, steps_per_epoch: int):
        super().__init__()
        c, size = config["ibot"], config["aug"]["view1"]["size"]
        vit, patch = timm_vit(config["model"], size, dynamic=True)
        self.student = MaskedVisionTransformerTIMM(vit=vit, pos_embed_initialization="skip")

        def head(out: int) -> nn.Module:
            return heads.DINOProjectionHead(vit.embed_dim, c["hidden_dim"], c["bottleneck_dim"],
                                            out, batch_norm=c["head_bn"],
                                            norm_last_layer=c["norm_last_layer"])

        self.student_head = head(c["out_dim"])
        self.student_patch_head = (self.student_head if c["shared_head"]
                                   else head(c["patch_out_dim"]))
        self.teacher = frozen_copy(self.student)
        self.teacher_head = frozen_copy(self.student_head, head(c["out_dim"]))
        self.teacher_patch_head = (self.teacher_head if c["shared_head"] else frozen_copy(
            self.student_patch_head, head(c["patch_out_dim"])))
        self.dino_loss = DINOLoss(c["out_dim"], student_temp=c["student_temp"],
                                  center_momentum=c["center_momentum"])
        self.patch_loss = IBOTPatchLoss(c["patch_out_dim"], student_temp=c["student_temp"],
                                        center_momentum=c["patch_center_momentum"])
        self.c, self.grid = c, size // patch
        self.warmup = c["warmup_teacher_temp_epochs"] * steps_per_epoch
        freeze = [epochs for regex, epochs in config["optim"]["freeze"] if "last_layer" in regex]
        self.freeze_steps = round(max(freeze, default=0) * steps_per_epoch)
        self.step, self.progress = 0, 0.0

    def trained(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters()
                if p.requires_grad and not n.startswith("teacher")]

    def _temp(self, start: str, end: str) -> float:
        t = min(1.0, self.step / self.warmup) if self.warmup else 1.0
        return self.c[start] + t * (self.c[end] - self.c[start])

    def loss(self, *views: torch.Tensor) -> torch.Tensor:
        c, g = self.c, torch.cat(views[:2])
        block = utils.random_block_mask(
            size=(g.shape[0], self.grid, self.grid), batch_mask_ratio=c["mask_prob"],
            min_image_mask_ratio=c["mask_ratio"][0], max_image_mask_ratio=c["mask_ratio"][1],
            min_num_masks_per_block=c["min_block_patches"],
            min_block_aspect_ratio=c["min_aspect"], device=g.device)
        mask = torch.cat([block.new_zeros(g.shape[0], 1), block.flatten(1)], 1)  # cls kept
        with torch.no_grad():
            t = self.teacher.encode(g)
            t_cls, t_patch = self.teacher_head(t[:, 0]), self.teacher_patch_head(t[mask])
        s = self.student.encode(g, mask=mask)
        s_cls = [self.student_head(s[:, 0])]
        if len(views) > 2:
            s_cls.append(self.student_head(self.student.encode(torch.cat(views[2:]))[:, 0]))
        s_patch = self.student_patch_head(s[mask])
        cls = self.dino_loss(t_cls.chunk(2), torch.cat(s_cls).chunk(len(views)),
                             teacher_temp=self._temp("warmup_teacher_temp", "teacher_temp"))
        patch = self.patch_loss(t_patch, s_patch, block, teacher_temp=self._temp(
            "warmup_teacher_patch_temp", "teacher_patch_temp"))
        return c["cls_loss_weight"] * cls + c["patch_loss_weight"] * patch

    def after_backward(self) -> None:
        if self.step < self.freeze_steps:
            for h in {self.student_head, self.student_patch_head}:
                for p in h.last_layer.parameters():
                    p.grad = None

    def after_step(self) -> None:
        m = cosine_momentum(self.c["momentum_teacher"], self.progress)
        for student, teacher in ((self.student, self.teacher),
                                 (self.student_head, self.teacher_head),
                                 (self.student_patch_head, self.teacher_patch_head)):
            utils.update_momentum(student, teacher, m)

    def exported(self) -> dict[str, torch.Tensor]:
        """The teacher (the encoder the project's iBOT evaluates), timm keys + mask token."""
        weights = dict(self.teacher.vit.state_dict())
        weights["mask_token"] = self.teacher.mask_token
        return weights


MODELS = {"byol": BYOL, "moco_v2": MoCo, "moco_v3": MoCoV3, "simmim": SimMIM, "ibot": IBOT}
