"""Causal self-attention in query blocks for training (no KV cache): blocks the causal mask hides are never computed.

Why. In training (`Transformer.hidden_states` without a cache: the PPO/GRPO forward and backward) the mask is
causal plus key padding. The dense `attention` builds and softmaxes the whole [B, Hkv, G, T, T] float32 score
matrix, masks half of it away, and its autodiff keeps the probabilities for the backward pass: on CPU this
elementwise work and memory traffic cost about twice attention's share of the FLOPs. Here:

* Queries go in blocks of `block` rows (the last block may be shorter: any T works). Under a causal mask query
  block i sees exactly the key prefix [0, end of block i), so the key blocks above the diagonal are skipped
  statically: their shapes are known at trace time and they are never computed. With n query blocks the score,
  softmax and probability-value work falls to (n + 1) / 2n of the dense one (T 384: 2/3 at block 128, 7/12 at
  64); only the prefix is masked (causal on its last block, key padding on all of it).
* One softmax per query block over its whole key prefix. The prefix is contiguous, so its row maximum and sum are
  exact in one pass; an online (running max / sum, flash-attention) softmax over key blocks would only cut the
  same matmuls into smaller ones plus rescaling passes, which XLA on CPU runs slower, and bound a transient that
  is already small: at most [B, Hkv, G, block, T] float32 scores exist at a time instead of [B, Hkv, G, T, T].
* A `jax.custom_vjp` keeps only the output and each query's log-sum-exp (O(T) per head beyond q/k/v/out) and
  recomputes each block's probabilities in the backward pass from them, where autodiff would keep every block's
  probabilities. Matmul operands stay in the input dtype with float32 accumulation, as in the dense path.
* Key padding is masked, not skipped. Which key blocks padding hides for a row depends on the data (the leading
  blocks of a short, left-padded prompt, the trailing ones of a short response), so skipping them means a
  data-dependent branch per (row, block): XLA on CPU runs `lax.cond` serially and it splits the batched matmuls
  into per-row ones, for a saving of at most the few padded blocks of a few rows. Masked keys cost the same as in
  the dense path, nothing more.
* A fully masked query (a left-padding position: no valid key at or before it) gets exactly what the dense path
  gives it: there every score is the finite `MASK_VALUE`, the softmax is uniform over all T keys, so the output is
  the mean of v over all keys, finite, with zero gradient to q and k. `blocked_causal_attention` selects that mean
  for those rows, so the losses that mask these positions, and the model's hidden states, are unchanged.

`jax.nn.dot_product_attention` is not used: on CPU (`implementation="xla"`) it builds the same full masked score
matrix as the dense path, skips nothing, and treats fully masked rows differently.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

# The dense path's mask value: finite, so a fully masked row's softmax is uniform rather than NaN.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def query_blocks(length: int, block: int) -> tuple[tuple[int, int], ...]:
    """[start, stop) of each query block; the last one is shorter when `block` does not divide `length`."""
    if block <= 0:
        raise ValueError(f"block must be a positive int, got {block!r}")
    return tuple((start, min(start + block, length)) for start in range(0, length, block))


def _block_mask(valid: jax.Array, start: int, stop: int) -> jax.Array:
    """Visibility [B, 1, n, 1, stop] of keys [0, stop) to queries [start, stop): causal and key padding."""
    rows = start + jnp.arange(stop - start)
    causal = jnp.arange(stop)[None, :] <= rows[:, None]  # [n, stop], constant under jit
    return causal[None, None, :, None, :] & valid[:, None, None, None, :stop]


def _block_scores(q_block: jax.Array, keys: jax.Array, mask: jax.Array, scale: float) -> jax.Array:
    """Masked float32 scores [B, Hkv, n, G, S'] of q_block [B, Hkv, n, G, D] against keys [B, Hkv, S', D]."""
    s = jnp.einsum("bktgd,bksd->bktgs", q_block, keys, preferred_element_type=jnp.float32) * scale
    return jnp.where(mask, s, MASK_VALUE)


def _forward(q: jax.Array, k: jax.Array, v: jax.Array, valid: jax.Array, block: int
             ) -> tuple[jax.Array, jax.Array]:
    """Head-major attention q [B,Hkv,T,G,D], k/v [B,Hkv,T,D] -> (out [B,Hkv,T,G,D] in v's dtype, lse [B,Hkv,T,G])."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    outs, lses = [], []
    for start, stop in query_blocks(q.shape[2], block):
        s = _block_scores(q[:, :, start:stop], k[:, :, :stop], _block_mask(valid, start, stop), scale)
        peak = jnp.max(s, axis=-1, keepdims=True)
        p = jnp.exp(s - peak)
        total = jnp.sum(p, axis=-1, keepdims=True)
        out = jnp.einsum("bktgs,bksd->bktgd", p.astype(v.dtype), v[:, :, :stop], preferred_element_type=jnp.float32)
        outs.append((out / total).astype(v.dtype))
        lses.append((peak + jnp.log(total))[..., 0])
    return jnp.concatenate(outs, axis=2), jnp.concatenate(lses, axis=2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def causal_attention_heads(q: jax.Array, k: jax.Array, v: jax.Array, valid: jax.Array, block: int) -> jax.Array:
    """Causal attention with key padding, head-major: q [B,Hkv,T,G,D], k/v [B,Hkv,T,D], valid [B,T] -> [B,Hkv,T,G,D].

    A query with no visible key gets the mean of v over its block's key prefix (finite; the public wrapper
    replaces it with the dense path's value).
    """
    return _forward(q, k, v, valid, block)[0]


def _fwd(q, k, v, valid, block):
    out, lse = _forward(q, k, v, valid, block)
    return out, (q, k, v, valid, out, lse)


def _bwd(block, residuals, g):
    q, k, v, valid, out, lse = residuals
    scale = 1.0 / math.sqrt(q.shape[-1])
    do = g.astype(jnp.float32)
    delta = jnp.sum(do * out.astype(jnp.float32), axis=-1)  # [B, Hkv, T, G]: rowsum(dO * O)
    dq_blocks = []
    dk = jnp.zeros(k.shape, jnp.float32)
    dv = jnp.zeros(v.shape, jnp.float32)
    for start, stop in query_blocks(q.shape[2], block):
        q_block, keys, values = q[:, :, start:stop], k[:, :, :stop], v[:, :, :stop]
        do_block = g[:, :, start:stop]
        mask = _block_mask(valid, start, stop)
        p = jnp.exp(_block_scores(q_block, keys, mask, scale) - lse[:, :, start:stop, :, None])
        dv = dv.at[:, :, :stop].add(
            jnp.einsum("bktgs,bktgd->bksd", p.astype(g.dtype), do_block, preferred_element_type=jnp.float32))
        dp = jnp.einsum("bktgd,bksd->bktgs", do_block, values.astype(g.dtype), preferred_element_type=jnp.float32)
        # Masked scores get no gradient (the dense path's `where`), also in rows where every key is masked.
        ds = jnp.where(mask, p * (dp - delta[:, :, start:stop, :, None]), 0.0) * scale
        ds = ds.astype(q.dtype)
        dq_blocks.append(jnp.einsum("bktgs,bksd->bktgd", ds, keys, preferred_element_type=jnp.float32))
        dk = dk.at[:, :, :stop].add(jnp.einsum("bktgs,bktgd->bksd", ds, q_block, preferred_element_type=jnp.float32))
    dq = jnp.concatenate(dq_blocks, axis=2)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


causal_attention_heads.defvjp(_fwd, _bwd)


def blocked_causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, valid: jax.Array, block: int) -> jax.Array:
    """Grouped-query causal self-attention with key padding in query blocks of `block` rows.

    q [B,T,H,D], k/v [B,T,Hkv,D], valid [B,T] (real tokens) -> [B,T,H,D]: the same values and gradients as
    `attention(q, k, v, tril(T, T) & valid[:, None, :])`, fully masked queries included.
    """
    b, t, h, d = q.shape
    kv_heads = k.shape[2]
    if k.shape != (b, t, kv_heads, d) or v.shape != k.shape or valid.shape != (b, t) or h % kv_heads:
        raise ValueError(f"blocked_causal_attention needs self-attention shapes q [B,T,H,D], k/v [B,T,Hkv,D] with "
                         f"Hkv dividing H, valid [B,T]; got q {q.shape}, k {k.shape}, v {v.shape}, "
                         f"valid {valid.shape}")
    valid = valid.astype(bool)
    groups = h // kv_heads
    q_heads = q.reshape(b, t, kv_heads, groups, d).transpose(0, 2, 1, 3, 4)
    out = causal_attention_heads(q_heads, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), valid, block)
    out = out.transpose(0, 2, 1, 3, 4)  # [B, T, Hkv, G, D]
    # Queries with no valid key at or before them: the dense softmax is uniform over all T keys there.
    seen = jnp.cumsum(valid.astype(jnp.int32), axis=1) > 0
    uniform = jnp.mean(v.astype(jnp.float32), axis=1).astype(v.dtype)  # [B, Hkv, D]
    out = jnp.where(seen[:, :, None, None, None], out, uniform[:, None, :, None, :])
    return out.reshape(b, t, h, d)


__all__ = ["MASK_VALUE", "blocked_causal_attention", "causal_attention_heads", "query_blocks"]
