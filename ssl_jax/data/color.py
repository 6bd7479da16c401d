"""CIE Lab on the device: sRGB <-> Lab (D65 white, 2-degree observer), as jittable jnp.

The formulas are those of the CIE / IEC 61966-2-1 standards, with the constants that
scikit-image's ``rgb2lab`` / ``lab2rgb`` use (tests compare against them)::

    linear  c_lin = ((c + 0.055) / 1.055)^2.4   if c > 0.04045,  else c / 12.92
    XYZ     = M c_lin,  normalised by the white (0.95047, 1, 1.08883)
    f(t)    = t^(1/3)                            if t > 0.008856, else 7.787 t + 16 / 116
    L = 116 f(Y) - 16,   a = 500 (f(X) - f(Y)),   b = 200 (f(Y) - f(Z))

``L`` lies in [0, 100]; ``a, b`` of sRGB colours in about [-86, 98] x [-108, 95]. The inverse
clips a negative ``f(Z)`` to 0 and the final RGB to [0, 1], as scikit-image does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# sRGB (linear) -> XYZ, and the D65 white point (2-degree observer).
XYZ_FROM_RGB = np.array([[0.412453, 0.357580, 0.180423],
                         [0.212671, 0.715160, 0.072169],
                         [0.019334, 0.119193, 0.950227]])
RGB_FROM_XYZ = np.linalg.inv(XYZ_FROM_RGB)
WHITE_D65 = np.array([0.95047, 1.0, 1.08883])
_EPS = 0.008856  # (6/29)^3, rounded as in the standard
_KAPPA = 7.787  # (29/6)^2 / 3, rounded


def rgb_to_lab(rgb: jax.Array) -> jax.Array:
    """``[..., 3]`` sRGB in [0, 1] -> ``[..., 3]`` Lab (L in [0, 100]), float32."""
    rgb = jnp.clip(rgb.astype(jnp.float32), 0.0, 1.0)
    linear = jnp.where(rgb > 0.04045,
                       jnp.power(jnp.maximum(rgb + 0.055, 1e-6) / 1.055, 2.4), rgb / 12.92)
    xyz = linear @ jnp.asarray(XYZ_FROM_RGB.T / WHITE_D65[None, :], jnp.float32)
    f = jnp.where(xyz > _EPS, jnp.cbrt(jnp.maximum(xyz, 0.0)), _KAPPA * xyz + 16.0 / 116.0)
    fx, fy, fz = f[..., 0], f[..., 1], f[..., 2]
    return jnp.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], axis=-1)


def lab_to_rgb(lab: jax.Array) -> jax.Array:
    """``[..., 3]`` Lab -> ``[..., 3]`` sRGB clipped to [0, 1], float32 (out-of-gamut colours
    are clipped, as scikit-image's ``lab2rgb``)."""
    lab = lab.astype(jnp.float32)
    fy = (lab[..., 0] + 16.0) / 116.0
    fz = jnp.maximum(fy - lab[..., 2] / 200.0, 0.0)  # a negative Z: clipped to 0
    f = jnp.stack([fy + lab[..., 1] / 500.0, fy, fz], axis=-1)
    xyz = jnp.where(f > 0.2068966, f ** 3, (f - 16.0 / 116.0) / _KAPPA)
    linear = (xyz * jnp.asarray(WHITE_D65, jnp.float32)) @ jnp.asarray(RGB_FROM_XYZ.T,
                                                                      jnp.float32)
    rgb = jnp.where(linear > 0.0031308,
                    1.055 * jnp.power(jnp.maximum(linear, 1e-12), 1.0 / 2.4) - 0.055,
                    linear * 12.92)
    return jnp.clip(rgb, 0.0, 1.0)
