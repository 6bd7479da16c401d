"""The conversions checked against timm itself, and ``.pth`` files read through torch: these run
only where torch and timm are installed (``pip install -e '.[torch]' timm``; CI has neither and
checks parity on the committed fixture instead, tests/test_convert.py)."""

from __future__ import annotations

import argparse
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")

from benchmarks import convert_parity  # noqa: E402
from ssl_jax.convert.files import WeightsError, read_weights  # noqa: E402

CASES = ["ViT-S/16-like (2 blocks, 32 px)", "ViT sin-cos, mean pool", "BEiT-like",
         "ResNet-18 x1/8", "ResNet-18, CIFAR stem, full width", "ResNet-50 x1/8, CIFAR stem"]


@pytest.mark.parametrize("name", CASES)
def test_timm_and_the_project_give_the_same_features_both_ways(name):
    """Random timm model -> import, and random project encoder -> export -> timm's model from
    create_model + the spec's patch lines + load_state_dict(strict=True): the same features to
    1e-5 (of the largest feature, when that is above 1)."""
    model, size, batch = convert_parity.QUICK[name]
    for direction in (convert_parity.timm_to_jax, convert_parity.jax_to_timm):
        errors = direction(model, size, batch)
        assert errors["max_abs"] <= 1e-5 * max(1.0, errors["max_abs"] / errors["relative"]), \
            (direction.__name__, errors)


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pth_files_are_read_with_weights_only(tmp_path):
    """A timm state_dict saved by torch reads back; a DINO-style checkpoint with its
    argparse.Namespace needs --allow_pickle_classes (and is then read weights-only); one that
    would run code is refused with or without it, and nothing runs."""
    state = {"cls_token": torch.randn(1, 1, 4), "blocks.0.norm1.weight": torch.ones(4)}
    plain = tmp_path / "timm.pth"
    torch.save(state, plain)
    read = read_weights(str(plain))
    assert sorted(read) == sorted(state)
    np.testing.assert_array_equal(read["cls_token"], state["cls_token"].numpy())

    checkpoint = tmp_path / "checkpoint.pth"
    torch.save({"teacher": state, "args": argparse.Namespace(lr=0.1), "epoch": 3}, checkpoint)
    with pytest.raises(WeightsError, match=r"argparse\.Namespace .*--allow_pickle_classes"):
        read_weights(str(checkpoint))
    read = read_weights(str(checkpoint), allow_classes=True)
    np.testing.assert_array_equal(read["teacher"]["cls_token"], state["cls_token"].numpy())

    marker = tmp_path / "code_ran"
    evil = tmp_path / "evil.pth"
    torch.save({"model": state, "x": _RunsCode(marker)}, evil)
    for allow in (False, True):
        with pytest.raises(WeightsError, match=r"refused: its pickle names .*posix\.system"):
            read_weights(str(evil), allow_classes=allow)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(plain.read_bytes()[:200])
    with pytest.raises(WeightsError, match="truncated"):
        read_weights(str(truncated))
    assert not marker.exists()
