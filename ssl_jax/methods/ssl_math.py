"""The maths that self-supervised methods share, as small pure functions.

Method files import these instead of defining (or importing from another method) their own:

- teacher-student (DINO, BYOL, MoCo, iBOT): :func:`ema`, :func:`cosine_momentum`,
  :func:`update_center`, :func:`teacher_forward`;
- MoCo v2's dictionary: :func:`enqueue` (a FIFO queue of keys in the method's state) and
  :func:`queue_info_nce` (InfoNCE against the queue);
- schedules of temperatures and weights: :func:`linear_warmup`, :func:`cosine_anneal`;
- contrastive (SimCLR, MoCo v3, CLIP): :func:`nt_xent` and :func:`info_nce`, whose negatives
  come from the **global** batch: under a mesh the projections are all-gathered inside
  ``jax.shard_map``, so the loss is that of the global batch whatever the device count;
- masked modelling (MAE, SimMIM, BEiT): :func:`patchify`, :func:`unpatchify`,
  :func:`reconstruction_panels` (the evaluation's original | masked | reconstruction picture);
- networks with non-trained state (BatchNorm): :func:`apply_network`, :func:`split_variables`,
  :func:`apply_network_in_groups` (BatchNorm statistics per group of the batch);
- dense pretext tasks (colorization, inpainting): :func:`feature_map` (a ResNet's last stage or
  a ViT's patch tokens as a spatial map);
- collapse indicators: :func:`feature_std`.

Each is tested against a NumPy reference in ``tests/test_ssl_math.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from ssl_jax.data import augment
from ssl_jax.models.vit import ViT
from ssl_jax.parallel import BATCH_AXES

# --- Teacher-student ----------------------------------------------------------------------------


def ema(teacher: Any, student: Any, momentum: jax.Array | float) -> Any:
    """``momentum * teacher + (1 - momentum) * student``, leaf by leaf, in the teacher's dtype."""
    return jax.tree_util.tree_map(
        lambda t, s: (momentum * t + (1.0 - momentum) * s).astype(t.dtype), teacher, student)


def cosine_momentum(step: jax.Array | int, base: float, total_steps: int) -> jax.Array:
    """``m(step) = 1 - (1 - base) (cos(pi step / T) + 1) / 2`` with ``T = total_steps``: ``base``
    at step 0 rising to 1 at the end (BYOL's tau, DINO's ``cosine_scheduler(base, 1, ...)``,
    MoCo v3's m). Steps past ``T`` stay at 1."""
    t = jnp.minimum(jnp.asarray(step, jnp.float32), total_steps) / max(total_steps, 1)
    return 1.0 - (1.0 - base) * (jnp.cos(jnp.pi * t) + 1.0) / 2.0


def update_center(center: jax.Array, teacher_out: jax.Array, momentum: float) -> jax.Array:
    """``C <- m C + (1 - m) mean(teacher_out)``: ``center [K]``, ``teacher_out [..., K]`` the raw
    teacher outputs of the global batch (the mean is over every leading axis; under ``jax.jit``
    over arrays sharded on the mesh that mean is global). No gradient flows into it."""
    batch_center = jnp.mean(jax.lax.stop_gradient(teacher_out).astype(jnp.float32),
                            axis=tuple(range(teacher_out.ndim - 1)))
    chex.assert_equal_shape((center, batch_center))
    return momentum * center + (1.0 - momentum) * batch_center


def split_variables(variables: Any) -> tuple[Any, dict[str, Any]]:
    """Flax variables -> ``(params, {other collections})`` (BatchNorm's ``batch_stats``)."""
    return variables["params"], {k: v for k, v in variables.items() if k != "params"}


def apply_network(module: nn.Module, params: Any, state: dict[str, Any], x: Any, *,
                  train: bool, rng: jax.Array | None = None, **kwargs: Any
                  ) -> tuple[Any, dict[str, Any]]:
    """``module.apply`` with its non-trained collections ``state`` (BatchNorm statistics):
    ``(output, updated state)``; the state is unchanged when ``train`` is False or empty.
    ``rng`` feeds the ``dropout`` stream (dropout, stochastic depth)."""
    rngs = {"dropout": rng} if rng is not None else {}
    if train and state:
        out, new_state = module.apply({"params": params, **state}, x, train=train,
                                      mutable=list(state), rngs=rngs, **kwargs)
        return out, dict(new_state)
    return module.apply({"params": params, **state}, x, train=train, rngs=rngs, **kwargs), state


def feature_map(encoder: nn.Module, params: Any, state: dict[str, Any], x: jax.Array, *,
                train: bool, rng: jax.Array | None = None) -> tuple[jax.Array, dict[str, Any]]:
    """The encoder's spatial feature map ``[batch, h', w', d]`` (float32) of ``x [batch, h, w,
    c]`` and its updated state (:func:`apply_network`): a ViT's patch tokens after the final
    LayerNorm on the patch grid (``h' = h / patch``), a ResNet's last stage before pooling."""
    if isinstance(encoder, ViT):
        tokens, state = apply_network(encoder, params, state, x, train=train, rng=rng,
                                      return_tokens=True)
        rows, cols = x.shape[1] // encoder.patch_size, x.shape[2] // encoder.patch_size
        patches = tokens[:, encoder.num_prefix_tokens:].astype(jnp.float32)
        return patches.reshape(x.shape[0], rows, cols, encoder.dim), state
    return apply_network(encoder, params, state, x, train=train, rng=rng, return_map=True)


def init_dense(encoder: nn.Module, head: nn.Module, rng: jax.Array, x: jax.Array
               ) -> tuple[Any, dict[str, Any], Any]:
    """``(encoder params, encoder state, head params)`` of an encoder whose
    :func:`feature_map` of ``x`` feeds a dense ``head`` (colorization's, inpainting's decoder)."""
    k_enc, k_head = jax.random.split(rng)
    params, state = split_variables(
        encoder.init({"params": k_enc, "dropout": k_enc}, x, train=False))
    fmap, _ = feature_map(encoder, params, state, x, train=False)
    return params, state, head.init(k_head, fmap)["params"]


def apply_network_in_groups(module: nn.Module, params: Any, state: dict[str, Any], x: jax.Array,
                            groups: int, *, train: bool, rng: jax.Array | None = None
                            ) -> tuple[Any, dict[str, Any]]:
    """:func:`apply_network` with BatchNorm statistics of ``groups`` contiguous groups of the
    batch ``x [n, ...]`` (``n / groups`` rows each) instead of the whole batch: the groups of
    MoCo's per-GPU BatchNorm, fixed by the global batch's order rather than by the devices, so
    1 and N devices compute the same. The running statistics move by the mean over groups of each
    group's update. A network without state (no BatchNorm), ``groups == 1`` or ``train=False``
    is :func:`apply_network` itself."""
    if groups == 1 or not train or not state:
        return apply_network(module, params, state, x, train=train, rng=rng)
    if x.shape[0] % groups:
        raise ValueError(f"a batch of {x.shape[0]} does not split into {groups} BatchNorm groups")

    def one_group(xg):
        return apply_network(module, params, state, xg, train=True, rng=rng)

    out, new_state = jax.vmap(one_group)(x.reshape(groups, -1, *x.shape[1:]))
    out = jax.tree_util.tree_map(lambda o: o.reshape(-1, *o.shape[2:]), out)
    return out, jax.tree_util.tree_map(lambda s: jnp.mean(s, axis=0), new_state)


def teacher_forward(module: nn.Module, params: Any, state: dict[str, Any], x: Any, *,
                    apply: Callable[..., Any] = apply_network, **kwargs: Any
                    ) -> tuple[Any, dict[str, Any]]:
    """The stop-gradient teacher: :func:`apply_network` (or ``apply``, e.g.
    :func:`apply_network_in_groups` with its groups bound) in training mode (BatchNorm normalises
    with the batch and updates the teacher's own statistics, as DINO and BYOL run their
    teachers) on ``stop_gradient(params)``; the output carries no gradient."""
    out, state = apply(module, jax.lax.stop_gradient(params), state, x, train=True, **kwargs)
    return jax.lax.stop_gradient(out), state


# --- Schedules ----------------------------------------------------------------------------------


def linear_warmup(step: jax.Array | int, start: float, end: float, warmup_steps: int
                  ) -> jax.Array:
    """Linear from ``start`` at step 0 to ``end`` at ``warmup_steps``, constant after; ``end``
    from step 0 when ``warmup_steps <= 0`` (DINO's teacher temperature 0.04 -> 0.07)."""
    if warmup_steps <= 0:
        return jnp.asarray(end, jnp.float32)
    frac = jnp.minimum(jnp.asarray(step, jnp.float32) / warmup_steps, 1.0)
    return start + (end - start) * frac


def cosine_anneal(step: jax.Array | int, start: float, end: float, steps: int) -> jax.Array:
    """``end + (start - end) * (1 + cos(pi * min(step / steps, 1))) / 2``; ``end`` from step 0
    when ``steps <= 0`` (the dVAE's Gumbel temperature 1 -> 1/16 and KL-weight warm-up)."""
    if steps <= 0:
        return jnp.asarray(end, jnp.float32)
    t = jnp.clip(jnp.asarray(step, jnp.float32) / steps, 0.0, 1.0)
    return end + (start - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * t))


# --- Contrastive losses with global negatives -----------------------------------------------------


def l2_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
    """``x / max(||x||, 1e-12)`` along ``axis``, in float32."""
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def _gathered(x: jax.Array, axes: Any) -> tuple[jax.Array, jax.Array]:
    """``(rows of the whole batch, offset of this shard's first row)``: the all-gather over the
    mesh's batch axes inside ``shard_map``, or ``x`` itself on one shard."""
    if axes is None:
        return x, jnp.zeros((), jnp.int32)
    return jax.lax.all_gather(x, axes, tiled=True), jax.lax.axis_index(axes) * x.shape[0]


def _sum_over_shards(local_fn: Callable[..., tuple[jax.Array, jax.Array]], mesh: Mesh | None,
                     *arrays: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Runs ``local_fn(*shards, axes)`` per shard of the global batch and sums its two outputs
    over the shards (``jax.shard_map`` with ``psum``), or on the whole batch without a mesh."""
    if mesh is None:
        return local_fn(*arrays, None)

    def per_shard(*shards):
        return tuple(jax.lax.psum(v, BATCH_AXES) for v in local_fn(*shards, BATCH_AXES))

    return jax.shard_map(per_shard, mesh=mesh, in_specs=(P(BATCH_AXES),) * len(arrays),
                         out_specs=(P(), P()))(*arrays)


def _cross_entropy_sums(logits: jax.Array, positive: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Summed ``-log softmax(logits)[positive]`` over the rows, and how many rows rank their
    positive first."""
    log_prob = jax.nn.log_softmax(logits, axis=-1)
    loss = -jnp.take_along_axis(log_prob, positive[:, None], axis=-1)[:, 0]
    return loss.sum(), (jnp.argmax(logits, axis=-1) == positive).sum()


def _nt_xent_sums(z1: jax.Array, z2: jax.Array, temperature: float, axes: Any):
    local = z1.shape[0]
    a1, a2 = l2_normalize(z1), l2_normalize(z2)
    g1, offset = _gathered(a1, axes)
    g2, _ = _gathered(a2, axes)
    total = g1.shape[0]
    candidates = jnp.concatenate([g1, g2], axis=0)  # [2N, dim]
    logits = jnp.concatenate([a1, a2], axis=0) @ candidates.T / temperature  # [2 local, 2N]
    rows = jnp.arange(local) + offset
    self_index = jnp.concatenate([rows, rows + total])
    logits = jnp.where(jnp.arange(2 * total)[None, :] == self_index[:, None], -jnp.inf, logits)
    return _cross_entropy_sums(logits, jnp.concatenate([rows + total, rows]))


def nt_xent(z1: jax.Array, z2: jax.Array, temperature: float, mesh: Mesh | None = None
            ) -> tuple[jax.Array, jax.Array]:
    """SimCLR's NT-Xent (eq. 1 of Chen et al. 2020) averaged over all ``2N`` anchors::

        l(i, j) = -log exp(sim(z_i, z_j) / tau) / sum_{k != i} exp(sim(z_i, z_k) / tau)

    ``z1, z2 [N, dim]``: projections of the two views of the same images (cosine similarity:
    they are L2-normalised here), sharded over the mesh's batch axes when ``mesh`` is given;
    every anchor is contrasted with the ``2N - 2`` other views of the global batch. Returns
    ``(loss, accuracy)``: the accuracy is the share of anchors that rank their positive first."""
    chex.assert_equal_shape((z1, z2))
    loss, correct = _sum_over_shards(
        lambda a, b, axes: _nt_xent_sums(a, b, temperature, axes), mesh, z1, z2)
    count = 2 * z1.shape[0]
    return loss / count, correct / count


def _info_nce_sums(queries: jax.Array, keys: jax.Array, temperature: float, axes: Any):
    q, k = l2_normalize(queries), l2_normalize(keys)
    all_keys, offset = _gathered(k, axes)
    logits = q @ all_keys.T / temperature  # [local, N]
    return _cross_entropy_sums(logits, jnp.arange(q.shape[0]) + offset)


def info_nce(queries: jax.Array, keys: jax.Array, temperature: float, mesh: Mesh | None = None
             ) -> tuple[jax.Array, jax.Array]:
    """InfoNCE (Oord et al. 2018) of queries against the keys of the global batch, as MoCo v3
    and CLIP use it: query ``i``'s positive is key ``i``, its negatives the ``N - 1`` other
    keys of the global batch::

        L = -1/N sum_i log exp(q_i . k_i / tau) / sum_j exp(q_i . k_j / tau)

    ``queries, keys [N, dim]`` (L2-normalised here), sharded over the mesh's batch axes when
    ``mesh`` is given. Returns ``(loss, accuracy)`` (the share of queries whose own key ranks
    first). MoCo v3 scales this loss by ``2 tau``; that factor is the method's."""
    chex.assert_equal_shape((queries, keys))
    loss, correct = _sum_over_shards(
        lambda q, k, axes: _info_nce_sums(q, k, temperature, axes), mesh, queries, keys)
    return loss / queries.shape[0], correct / queries.shape[0]


def enqueue(queue: jax.Array, ptr: jax.Array, keys: jax.Array) -> tuple[jax.Array, jax.Array]:
    """MoCo's ``_dequeue_and_enqueue``: ``keys [n, dim]`` (the global batch's, in its order)
    replace the ``n`` oldest rows of ``queue [K, dim]`` starting at row ``ptr``, and the pointer
    moves on by ``n`` modulo ``K`` (a ring: after ``K / n`` steps it wraps to row 0). ``K`` must be
    a multiple of ``n`` (MoCo's ``assert K % batch_size == 0``). No gradient flows into it."""
    chex.assert_rank([queue, keys], 2)
    size, n = queue.shape[0], keys.shape[0]
    if size % n:
        raise ValueError(f"a queue of {size} keys is not a multiple of the {n} keys enqueued")
    keys = jax.lax.stop_gradient(keys).astype(queue.dtype)
    queue = jax.lax.dynamic_update_slice(queue, keys, (ptr, jnp.zeros((), ptr.dtype)))
    return queue, (ptr + n) % size


def queue_info_nce(queries: jax.Array, keys: jax.Array, queue: jax.Array, temperature: float
                   ) -> tuple[jax.Array, jax.Array]:
    """MoCo's InfoNCE (Algorithm 1 of He et al. 2020): query ``i``'s positive is key ``i``, its
    negatives the ``K`` keys of the queue (not the batch's other keys)::

        logits_i = [q_i . k_i, q_i . queue_1, ..., q_i . queue_K] / tau,  label 0

    ``queries, keys [N, dim]`` (L2-normalised here), ``queue [K, dim]`` (rows already unit
    norm; no gradient reaches keys or queue). Every row's loss is its own, so under ``jax.jit``
    over a sharded batch the mean is that of the global batch. Returns ``(loss, accuracy)``."""
    chex.assert_equal_shape((queries, keys))
    q = l2_normalize(queries)
    k = jax.lax.stop_gradient(l2_normalize(keys))
    positive = jnp.sum(q * k, axis=-1, keepdims=True)  # [N, 1]
    negative = q @ jax.lax.stop_gradient(queue).astype(jnp.float32).T  # [N, K]
    logits = jnp.concatenate([positive, negative], axis=1) / temperature
    loss, correct = _cross_entropy_sums(logits, jnp.zeros((q.shape[0],), jnp.int32))
    return loss / q.shape[0], correct / q.shape[0]


# --- Patches ------------------------------------------------------------------------------------


def patchify(images: jax.Array, patch: int) -> jax.Array:
    """``[batch, h, w, c] -> [batch, (h/p) * (w/p), p * p * c]``, patches row-major, each patch's
    pixels row-major with channels last (MAE's ``patchify``)."""
    chex.assert_rank(images, 4)
    batch, h, w, c = images.shape
    if h % patch or w % patch:
        raise ValueError(f"image {h}x{w} is not divisible by patch size {patch}")
    x = images.reshape(batch, h // patch, patch, w // patch, patch, c)
    x = x.transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(batch, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(patches: jax.Array, patch: int, grid: tuple[int, int], channels: int = 3
               ) -> jax.Array:
    """Inverse of :func:`patchify`: ``[batch, rows * cols, p * p * c] -> [batch, h, w, c]``."""
    chex.assert_rank(patches, 3)
    batch = patches.shape[0]
    rows, cols = grid
    x = patches.reshape(batch, rows, cols, patch, patch, channels)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(batch, rows * patch, cols * patch, channels)


def reconstruction_panels(patches: jax.Array, pred: jax.Array, mask: jax.Array, patch: int,
                          grid: tuple[int, int]) -> dict[str, jax.Array]:
    """The columns of a pixel-reconstruction picture (MAE, SimMIM), ``[batch, h, w, 3]`` in
    [0, 1]: the image, the masked input (masked patches grey), and the reconstruction (the
    predicted masked patches, the visible ones pasted back). ``patches, pred [batch, N, p*p*3]``
    of normalised images, ``mask [batch, N]`` (1 = masked)."""
    m = mask.astype(patches.dtype)[:, :, None]
    to_image = lambda p: augment.denormalize(unpatchify(p, patch, grid))
    pixel_mask = unpatchify(jnp.broadcast_to(m, patches.shape), patch, grid)
    return {
        "original": to_image(patches),
        "masked": jnp.where(pixel_mask > 0, 0.5, to_image(patches)),
        "reconstruction": to_image(m * pred + (1 - m) * patches),
    }


# --- Collapse indicators ------------------------------------------------------------------------


def feature_std(feats: jax.Array) -> jax.Array:
    """Mean per-dimension standard deviation over the batch of L2-normalised ``feats [batch,
    d]``: about ``1 / sqrt(d)`` for well-spread features, near 0 when they collapse."""
    return jnp.std(l2_normalize(feats), axis=0).mean()
