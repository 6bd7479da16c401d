"""Batched image augmentation in plain torch for ``benchmarks/torch_peer.py``: the project's
on-device views (crop and flip through one ``affine_grid`` + ``grid_sample``, colour jitter,
grayscale, blur, solarize) as tensor ops on ``[B, 3, H, W]`` floats in [0, 1], with per-example
random parameters, the form a GPU-resident torch pipeline takes. Runs under the peers' Python."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MEAN = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
STD = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
LUMA = torch.tensor((0.2989, 0.587, 0.114)).view(1, 3, 1, 1)


def crop_theta(b: int, h: int, w: int, view: dict) -> torch.Tensor:
    """RandomResizedCrop boxes (one draw per example, clamped to fit) and horizontal flips as
    ``affine_grid`` matrices ``[b, 2, 3]`` (half-pixel centres)."""
    area = h * w * torch.empty(b).uniform_(*view["crop_scale"])
    log_r = torch.empty(b).uniform_(*(math.log(r) for r in view["crop_ratio"]))
    cw = torch.sqrt(area * log_r.exp()).round().clamp(1, w)
    ch = torch.sqrt(area / log_r.exp()).round().clamp(1, h)
    left = (torch.rand(b) * (w - cw + 1)).floor()
    top = (torch.rand(b) * (h - ch + 1)).floor()
    sx = cw / w
    if view["flip"]:
        sx = torch.where(torch.rand(b) < 0.5, -sx, sx)
    zero = torch.zeros(b)
    return torch.stack([torch.stack([sx, zero, (2 * left + cw) / w - 1], 1),
                        torch.stack([zero, ch / h, (2 * top + ch) / h - 1], 1)], 1)


def resample(x: torch.Tensor, theta: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resampling of ``x [B, 3, H, W]`` through ``theta`` to ``[B, 3, size, size]``."""
    grid = F.affine_grid(theta, [x.shape[0], 3, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _per_example(b: int, p: float) -> torch.Tensor:
    return (torch.rand(b) < p).view(b, 1, 1, 1)


def _uniform(b: int, low: float, high: float) -> torch.Tensor:
    return torch.empty(b).uniform_(low, high).view(b, 1, 1, 1)


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)
    cr = maxc - minc
    s = cr / torch.where(cr == maxc, torch.ones_like(maxc), maxc)
    crd = torch.where(cr == 0, torch.ones_like(cr), cr)
    rc, gc, bc = (maxc - r) / crd, (maxc - g) / crd, (maxc - b) / crd
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    return torch.stack((h, s, maxc), 1)


def hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    h, s, v = x.unbind(1)
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.to(torch.int32) % 6
    p = (v * (1 - s)).clamp(0, 1)
    q = (v * (1 - s * f)).clamp(0, 1)
    t = (v * (1 - s * (1 - f))).clamp(0, 1)
    mask = i.unsqueeze(1) == torch.arange(6, dtype=torch.int32).view(-1, 1, 1)
    a = torch.stack([torch.stack(c, 1) for c in ((v, q, p, p, t, v), (t, v, v, q, p, p),
                                                 (p, p, t, v, v, q))], 1)  # [B, 3, 6, H, W]
    return torch.einsum("bijk,bxijk->bxjk", mask.to(x.dtype), a)


def jitter_params(b: int, view: dict) -> dict:
    """Per-example ColorJitter factors (torchvision's ranges) and whether it applies (p)."""
    bright, contrast, sat, hue = view["jitter"]
    params = {"apply": _per_example(b, view["jitter_p"])}
    for name, v in (("brightness", bright), ("contrast", contrast), ("saturation", sat)):
        if v > 0:
            params[name] = _uniform(b, max(0, 1 - v), 1 + v)
    if hue > 0:
        params["hue"] = _uniform(b, -hue, hue).view(b, 1, 1)
    return params


def color_jitter(x: torch.Tensor, params: dict) -> torch.Tensor:
    """torchvision's ColorJitter (fixed op order) where ``params['apply']``."""
    y = x
    if "brightness" in params:
        y = (y * params["brightness"]).clamp(0, 1)
    if "contrast" in params:
        mean = (y * LUMA).sum(1, keepdim=True).mean((2, 3), keepdim=True)
        y = (params["contrast"] * y + (1 - params["contrast"]) * mean).clamp(0, 1)
    if "saturation" in params:
        gray = (y * LUMA).sum(1, keepdim=True)
        y = (params["saturation"] * y + (1 - params["saturation"]) * gray).clamp(0, 1)
    if "hue" in params:
        hsv = rgb_to_hsv(y)
        hsv = torch.stack((torch.fmod(hsv[:, 0] + params["hue"] + 1.0, 1.0), hsv[:, 1],
                           hsv[:, 2]), 1)
        y = hsv_to_rgb(hsv).clamp(0, 1)
    return torch.where(params["apply"], y, x)


def gaussian_blur(x: torch.Tensor, p: float) -> torch.Tensor:
    """Separable Gaussian blur, sigma ~ U(0.1, 2), SimCLR's kernel size, reflect padding."""
    b, c, h, w = x.shape
    radius = min(max(1, (h // 10) // 2), h - 1)
    taps = torch.arange(-radius, radius + 1, dtype=x.dtype)
    sigma = torch.empty(b, 1).uniform_(0.1, 2.0)
    k = torch.exp(-(taps**2) / (2 * sigma**2))
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # [b * c, taps]
    y = F.pad(x.reshape(1, b * c, h, w), (radius,) * 4, mode="reflect")
    y = F.conv2d(y, k.view(b * c, 1, 1, -1), groups=b * c)
    y = F.conv2d(y, k.view(b * c, 1, -1, 1), groups=b * c).view(b, c, h, w)
    return torch.where(_per_example(b, p), y, x)


def augment(images: torch.Tensor, view: dict, sizes: tuple[int, ...] = ()) -> list:
    """uint8 ``[B, H, W, 3]`` -> normalised float ``[B, 3, s, s]`` views, one per size in
    ``sizes`` (default: the view's), all of the same random crop, flip and colour jitter."""
    x = images.permute(0, 3, 1, 2).float() / 255.0
    b, _, h, w = x.shape
    theta = crop_theta(b, h, w, view)
    jitter = view["jitter_p"] > 0 and any(v > 0 for v in view["jitter"])
    params = jitter_params(b, view) if jitter else None
    outs = []
    for size in sizes or (view["size"],):
        y = resample(x, theta, size)
        if jitter:
            y = color_jitter(y, params)
        if view["grayscale_p"] > 0:
            gray = (y * LUMA).sum(1, keepdim=True).expand_as(y)
            y = torch.where(_per_example(b, view["grayscale_p"]), gray, y)
        if view["blur_p"] > 0:
            y = gaussian_blur(y, view["blur_p"])
        if view["solarize_p"] > 0:
            y = torch.where(_per_example(b, view["solarize_p"]) & (y >= 0.5), 1 - y, y)
        outs.append((y - MEAN) / STD)
    return outs
