"""A small DALL-E-like discrete VAE (Ramesh et al. 2021): BEiT's visual tokenizer.

The encoder maps a normalised image ``[batch, s, s, 3]`` to logits over a vocabulary of ``V``
visual tokens on a ``g x g`` grid, ``g = s / 2**num_downsample``::

    conv 3x3 -> group_0 -> down -> group_1 -> down -> ... -> group_n -> relu -> conv 1x1 to V

where ``n = num_downsample``, group ``i`` is ``num_res_blocks`` residual blocks of width
``hidden_dim * 2**i`` and ``down`` is a stride-2 3x3 convolution to the next group's width
(DALL-E: 4 groups, 3 max-pools, widths 1x/2x/4x/8x). The decoder mirrors it::

    codes [b, g, g, V] -> 1x1 conv (no bias) to codebook_dim -> conv 3x3 -> group_n -> up ->
    ... -> up -> group_0 -> relu -> conv 3x3 to 3 channels

The first 1x1 convolution of one-hot codes is a lookup in a ``[V, codebook_dim]`` codebook; of
soft (relaxed) codes it is the probability-weighted mean of the codebook rows. ``up`` is a
nearest-neighbour 2x upsample followed by a 3x3 convolution (no checkerboard artefacts of
transposed convolutions). Residual blocks follow DALL-E's: no normalisation, a bottleneck of
width ``w / 4`` (relu-conv3x3, relu-conv3x3, relu-conv3x3, relu-conv1x1) added with the
"post-gain" ``1 / L**2``, ``L`` the number of residual blocks of the network, so a deep
network starts close to the identity.
"""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from ssl_jax.models.layers import Conv


def group_widths(hidden_dim: int, num_downsample: int) -> tuple[int, ...]:
    """Channels of the ``num_downsample + 1`` groups, ``hidden_dim * 2**i`` for group ``i``
    (group 0 at full resolution)."""
    return tuple(hidden_dim * 2**i for i in range(num_downsample + 1))


class ResBlock(nn.Module):
    """``x + post_gain * f(x)`` with DALL-E's bottleneck ``f``; ``[b, h, w, c] -> same``."""

    width: int
    post_gain: float
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        hidden = max(self.width // 4, 1)
        h = x
        for i, (features, kernel) in enumerate(
                [(hidden, 3), (hidden, 3), (hidden, 3), (self.width, 1)]):
            h = Conv(features, (kernel, kernel), dtype=self.dtype, name=f"conv{i}")(nn.relu(h))
        return x + self.post_gain * h


def _post_gain(num_downsample: int, num_res_blocks: int) -> float:
    return 1.0 / max((num_downsample + 1) * num_res_blocks, 1) ** 2


class DVAEEncoder(nn.Module):
    """Normalised images ``[b, s, s, 3]`` -> hidden map ``[b, g, g, hidden_dim * 2**n]`` and
    token logits ``[b, g, g, vocab_size]``. Called as a module (``apply(v, x, train=False)``)
    it returns the mean-pooled hidden map ``[b, hidden_dim * 2**n]``: the features the
    evaluation job's linear probe and kNN read."""

    vocab_size: int
    hidden_dim: int
    num_downsample: int
    num_res_blocks: int
    dtype: jnp.dtype = jnp.float32

    def setup(self) -> None:
        widths = group_widths(self.hidden_dim, self.num_downsample)
        gain = _post_gain(self.num_downsample, self.num_res_blocks)
        self.stem = Conv(widths[0], (3, 3), dtype=self.dtype)
        self.groups = [[ResBlock(w, gain, self.dtype) for _ in range(self.num_res_blocks)]
                       for w in widths]
        self.downs = [Conv(w, (3, 3), strides=(2, 2), dtype=self.dtype) for w in widths[1:]]
        self.to_logits = Conv(self.vocab_size, (1, 1), dtype=self.dtype)

    @property
    def num_features(self) -> int:
        """Size of the pooled features (the last group's width)."""
        return group_widths(self.hidden_dim, self.num_downsample)[-1]

    def hidden(self, x: jax.Array) -> jax.Array:
        """``[b, s, s, 3] -> [b, g, g, num_features]`` (before the final relu)."""
        chex.assert_rank(x, 4)
        factor = 2**self.num_downsample
        if x.shape[1] % factor or x.shape[2] % factor:
            raise ValueError(f"image {x.shape[1]}x{x.shape[2]} is not divisible by "
                             f"2**num_downsample = {factor}")
        h = self.stem(x.astype(self.dtype))
        for i, blocks in enumerate(self.groups):
            for block in blocks:
                h = block(h)
            if i < self.num_downsample:
                h = self.downs[i](h)
        return h

    def logits(self, x: jax.Array) -> jax.Array:
        """``[b, s, s, 3] -> [b, g, g, vocab_size]`` float32 logits of q(z | x)."""
        return self.to_logits(nn.relu(self.hidden(x))).astype(jnp.float32)

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train  # no dropout or normalisation statistics
        return jnp.mean(self.hidden(x).astype(jnp.float32), axis=(1, 2))


class DVAEDecoder(nn.Module):
    """Codes ``[b, g, g, vocab_size]`` (one-hot or relaxed) -> images ``[b, s, s, 3]``,
    ``s = g * 2**num_downsample``, in the normalised pixel space of the encoder's input."""

    vocab_size: int
    hidden_dim: int
    codebook_dim: int
    num_downsample: int
    num_res_blocks: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, codes: jax.Array) -> jax.Array:
        chex.assert_rank(codes, 4)
        chex.assert_axis_dimension(codes, -1, self.vocab_size)
        widths = group_widths(self.hidden_dim, self.num_downsample)
        gain = _post_gain(self.num_downsample, self.num_res_blocks)
        # The codebook: one-hot codes select a row of this [V, codebook_dim] kernel.
        h = Conv(self.codebook_dim, (1, 1), use_bias=False, dtype=self.dtype,
                    name="codebook")(codes.astype(self.dtype))
        h = Conv(widths[-1], (3, 3), dtype=self.dtype, name="stem")(h)
        for i in reversed(range(self.num_downsample + 1)):
            for j in range(self.num_res_blocks):
                h = ResBlock(widths[i], gain, self.dtype, name=f"group{i}_block{j}")(h)
            if i > 0:
                b, hh, ww, c = h.shape
                h = jax.image.resize(h, (b, 2 * hh, 2 * ww, c), "nearest")
                h = Conv(widths[i - 1], (3, 3), dtype=self.dtype, name=f"up{i}")(h)
        out = Conv(3, (3, 3), dtype=self.dtype, name="to_pixels")(nn.relu(h))
        return out.astype(jnp.float32)


class DiscreteVAE(nn.Module):
    """Encoder + decoder; parameters ``{'encoder': ..., 'decoder': ...}``.

    ``apply(v, x, method='logits')``: ``[b, s, s, 3] -> [b, g, g, V]``;
    ``apply(v, codes, method='decode')``: ``[b, g, g, V] -> [b, s, s, 3]``;
    ``apply(v, x)`` (initialisation): both, decoding ``softmax(logits)``.
    """

    vocab_size: int
    hidden_dim: int
    codebook_dim: int
    num_downsample: int
    num_res_blocks: int
    dtype: jnp.dtype = jnp.float32

    def setup(self) -> None:
        self.encoder = DVAEEncoder(self.vocab_size, self.hidden_dim, self.num_downsample,
                                   self.num_res_blocks, self.dtype)
        self.decoder = DVAEDecoder(self.vocab_size, self.hidden_dim, self.codebook_dim,
                                   self.num_downsample, self.num_res_blocks, self.dtype)

    def logits(self, x: jax.Array) -> jax.Array:
        """Normalised images ``[b, s, s, 3]`` -> float32 logits ``[b, g, g, V]``."""
        return self.encoder.logits(x)

    def decode(self, codes: jax.Array) -> jax.Array:
        """Codes ``[b, g, g, V]`` -> reconstructed normalised images ``[b, s, s, 3]``."""
        return self.decoder(codes)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        logits = self.logits(x)
        return logits, self.decode(jax.nn.softmax(logits, axis=-1))
