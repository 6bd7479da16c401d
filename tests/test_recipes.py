"""The recipes follow the papers' code: crops drawn from the whole image as torchvision's
RandomResizedCrop (written out in NumPy here), the fine-tuning's mean pooling without the final
norm (MAE, BEiT), the LR-scaling formulas, the blur kernel per method."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from ssl_jax import optim, presets
from ssl_jax.data import augment, pipeline, sources

# --- Crops over a non-square image: torchvision's get_params in NumPy ----------------------


def torchvision_crop_box(rng: np.random.Generator, height: int, width: int, scale, ratio):
    """``RandomResizedCrop.get_params`` of torchvision, line by line."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.integers(0, height - h + 1), rng.integers(0, width - w + 1), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@pytest.mark.parametrize("hw", [(30, 80), (80, 30)])
def test_crop_boxes_within_a_padded_image_follow_torchvision(hw):
    """Boxes drawn inside the content (``image_hw``) of a padded 80x80 canvas have the
    distribution of torchvision's over the content alone: area, aspect, position, fallback."""
    height, width = hw
    scale, ratio, n = (0.08, 1.0), (3 / 4, 4 / 3), 4000
    keys = jax.random.split(jax.random.key(0), n)
    ours = np.asarray(jax.jit(jax.vmap(
        lambda k: augment.crop_box(k, jnp.int32(height), jnp.int32(width), scale, ratio)))(keys))
    rng = np.random.default_rng(0)
    ref = np.asarray([torchvision_crop_box(rng, height, width, scale, ratio) for _ in range(n)])
    top, left, h, w = ours.T
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= height).all() and (left + w <= width).all()  # never in the padding
    for name, a, b in (("area", h * w / (height * width), ref[:, 2] * ref[:, 3] / (height * width)),
                       ("aspect", np.log(w / h), np.log(ref[:, 3] / ref[:, 2])),
                       ("centre_y", (top + h / 2) / height, (ref[:, 0] + ref[:, 2] / 2) / height),
                       ("centre_x", (left + w / 2) / width, (ref[:, 1] + ref[:, 3] / 2) / width)):
        qs = np.linspace(0.05, 0.95, 10)
        np.testing.assert_allclose(np.quantile(a, qs), np.quantile(b, qs), atol=0.04,
                                   err_msg=name)
    # The crops of a 30x80 image reach its sides: left edges spread over the whole width.
    assert left.max() > 0.5 * width or top.max() > 0.5 * height


def test_whole_image_decode_keeps_the_sides_and_pads_with_edges():
    """``train_region='whole'``: a 40x100 image becomes 32x80 at the top left of a canvas of
    ceil(32 * 4/3) = 43 whose other pixels repeat the edge; the longer side past 4/3 is
    centre-cropped; the square mode still gives the centre square."""
    x = np.zeros((40, 100, 3), np.uint8)
    x[:, :50] = 200  # left half bright, right half dark
    canvas, hw = pipeline.decode_image(x, 32, canvas=43)
    assert canvas.shape == (43, 43, 3) and tuple(hw) == (32, 43)
    # 100 px scaled by 32/40 is 80 > 43: the central 53.75 px of the original are kept.
    assert canvas[:32, :20].mean() > 150 and canvas[:32, 25:43].mean() < 50
    np.testing.assert_array_equal(canvas[32:], np.broadcast_to(canvas[31:32], (11, 43, 3)))
    wide, hw = pipeline.decode_image(np.asarray(Image.fromarray(x).resize((50, 40))), 32, 43)
    assert tuple(hw) == (32, 40)  # 50x40 (aspect 1.25 <= 4/3) is kept whole
    np.testing.assert_array_equal(wide[:, 40:], np.broadcast_to(wide[:, 39:40], (43, 3, 3)))
    assert pipeline.decode_image(x, 32).shape == (32, 32, 3)


def test_train_fields_of_the_whole_region_and_its_bad_values():
    cfg = presets.data_config(image_size=32)
    assert set(sources.train_fields(cfg)) == {"image", "label"}
    cfg.train_region = "whole"
    fields = sources.train_fields(cfg)
    assert fields["image"].shape == (43, 43, 3) and fields["image_hw"] == sources.Field((2,),
                                                                                       "int32")
    assert sources.source_fields(cfg)["image"].shape == (32, 32, 3)  # evaluation: the square
    cfg.train_region = "all"
    with pytest.raises(sources.DataError, match="train_region"):
        sources.train_fields(cfg)
    cfg.train_region, cfg.max_aspect = "whole", 0.5
    with pytest.raises(sources.DataError, match="max_aspect"):
        sources.train_fields(cfg)


def test_augment_view_draws_crops_inside_image_hw():
    """A canvas whose padding is red (the pipeline pads with edge pixels instead): the crops of
    the 16x8 content show red only where the resampling filter reads just past the box's edge,
    while crops of the whole canvas are a third red."""
    canvas = np.zeros((32, 16, 16, 3), np.uint8)
    canvas[..., 0] = 255
    canvas[:, :16, :8] = 60
    hw = jnp.asarray([[16, 8]] * 32, jnp.int32)
    cfg = presets.view_config(size=8, color_jitter=0.0, grayscale_p=0.0, blur_p=0.0, flip=False)
    red = lambda out: float(jnp.mean(out[..., 0] - out[..., 1]))  # noqa: E731
    inside = augment.augment_view(jax.random.key(0), canvas, cfg, hw)
    anywhere = augment.augment_view(jax.random.key(0), canvas, cfg)
    assert red(inside) < 0.01 and red(anywhere) > 0.2


# --- Pooling, LR scaling, blur -------------------------------------------------------------


def test_gap_pooling_drops_the_final_norm_and_applies_fc_norm():
    """MAE / BEiT: logits = head(fc_norm(mean of the patch tokens *before* the final norm))."""
    from ssl_jax.finetuning.classifier import Classifier, without_unused
    from ssl_jax.models import create_encoder
    from ssl_jax.models.vit import LN_EPSILON

    encoder = create_encoder("vit_ti4", image_size=8, depth=2)
    model = Classifier(encoder, 5, "gap")
    x = jax.random.normal(jax.random.key(1), (3, 8, 8, 3))
    params = model.init(jax.random.key(2), x, train=False)["params"]
    assert "norm" not in params["encoder"] and "fc_norm" in params
    params["head"]["kernel"] = jax.random.normal(jax.random.key(3), params["head"]["kernel"].shape)
    params["fc_norm"]["scale"] = params["fc_norm"]["scale"] * 1.5
    logits = model.apply({"params": params}, x, train=False)
    tokens = encoder.apply({"params": params["encoder"]}, x, False, return_tokens=True,
                           final_norm=False)
    mean = np.asarray(tokens[:, 1:]).mean(axis=1)
    normed = (mean - mean.mean(-1, keepdims=True)) / np.sqrt(mean.var(-1, keepdims=True)
                                                               + LN_EPSILON)
    head = {k: np.asarray(v) for k, v in params["head"].items()}
    want = (normed * 1.5) @ head["kernel"] + head["bias"]
    np.testing.assert_allclose(np.asarray(logits), want, rtol=1e-4, atol=1e-5)
    pretrained = {"params": {**params["encoder"], "norm": {"scale": 0, "bias": 0}}}
    assert "norm" not in without_unused(encoder, "gap", pretrained)["params"]
    assert "norm" in without_unused(encoder, "cls", pretrained)["params"]


@pytest.mark.parametrize("scaling,base,batch,peak", [
    ("linear", 0.3, 4096, 4.8),        # SimCLR ImageNet: 0.3 x B/256
    ("sqrt", 0.075, 4096, 4.8),        # SimCLR's square-root rule: 0.075 x sqrt(B)
    ("linear", 1.0, 512, 2.0),         # SimCLR CIFAR-10 command: --learning_rate=1.0, B 512
    ("linear", 5e-4, 1024, 2e-3),      # DINO: lr 0.0005 x B/256
    ("linear", 1.5e-4, 4096, 2.4e-3),  # MAE: blr 1.5e-4 x B/256
    ("none", 1.5e-3, 2048, 1.5e-3),
])
def test_lr_scaling_formulas_take_the_papers_numbers(scaling, base, batch, peak):
    cfg = presets.optim_config(base_lr=base, lr_scaling=scaling)
    assert optim.peak_learning_rate(cfg, batch) == pytest.approx(peak)


def test_presets_peak_lrs():
    import importlib.util
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def config(name, arg):
        spec = importlib.util.spec_from_file_location(f"cfg_{name}", f"{root}/configs/{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.get_config(arg)

    for name, arg, peak in (("simclr", "data=cifar10", 2.0),
                            ("simclr", "data=imagenet2012", 4.8),
                            ("dino", "data=imagenet2012", 2e-3),
                            ("mae", "data=imagenet2012", 2.4e-3),
                            ("beit", "data=imagenet2012", 1.5e-3)):
        c = config(name, arg)
        assert optim.peak_learning_rate(c.optim, c.batch_size) == pytest.approx(peak), name


@pytest.mark.parametrize("arg, peak, warmup, decay, epochs", [
    ("data=imagenet2012", 2e-3, 5.0, 0.65, 100.0),  # MAE FINETUNE.md: blr 5e-4 x 1024/256
    ("data=imagenet2012,vit=l", 4e-3, 5.0, 0.75, 50.0),
    ("data=imagenet2012,method=beit", 4e-3, 20.0, 0.65, 100.0),  # BEiT README: --lr 4e-3
    ("data=imagenet2012,method=beit,vit=l", 1e-3, 5.0, 0.75, 50.0),
    ("data=digits,method=beit", 4e-3, 6.0, 0.65, 30.0),
])
def test_finetuning_recipes_of_mae_and_beit(arg, peak, warmup, decay, epochs):
    from ssl_jax.config import ConfigError
    from ssl_jax.finetuning import default_config

    c = default_config.get_config(arg)
    assert optim.peak_learning_rate(c.optim, c.batch_size) == pytest.approx(peak)
    assert (c.optim.warmup_epochs, c.optim.layer_decay, c.num_epochs) == (warmup, decay, epochs)
    if "imagenet2012" in arg:  # both papers' cosine ends at min_lr 1e-6
        assert c.batch_size == 1024
        assert peak * c.optim.end_lr_factor == pytest.approx(1e-6)
    with pytest.raises(ConfigError, match="unknown vit='h' for the BEiT"):
        default_config.get_config("data=imagenet2012,method=beit,vit=h")


def test_blur_kernel_rules():
    """SimCLR's kernel is 10% of the side (3 taps at 16-32 px); PIL's (DINO) is uncapped:
    radius ceil(3 sigma_max), 13 taps for sigma 2, below the side."""
    assert augment.blur_kernel_size(224, "simclr") == 23
    assert augment.blur_kernel_size(32, "simclr") == 3
    assert augment.blur_kernel_size(224, "pil", 2.0) == 13
    assert augment.blur_kernel_size(32, "pil", 2.0) == 13
    assert augment.blur_kernel_size(4, "pil", 2.0) == 7  # radius capped at side - 1
    assert presets.dino_view(size=16).blur_kernel == "pil"
    assert presets.view_config(size=16).blur_kernel == "simclr"
    with pytest.raises(ValueError, match="blur_kernel"):
        presets.view_config(size=16, blur_kernel="box")
    # On a 16-px view, DINO's blur at sigma 2 spreads a point over more pixels than SimCLR's.
    point = np.zeros((16, 16, 3), np.float32)
    point[8, 8] = 1.0
    pil = augment.gaussian_blur_fixed(jnp.asarray(point), 2.0, augment.blur_kernel_size(16, "pil"))
    capped = augment.gaussian_blur_fixed(jnp.asarray(point), 2.0, 3)
    assert float(pil[8, 8, 0]) < 0.5 * float(capped[8, 8, 0])
