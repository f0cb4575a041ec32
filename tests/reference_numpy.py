"""An independent numpy transcription of the Llama/Qwen2 forward pass (HF semantics).

Used as the oracle for the Flax model: written from the published equations, sharing no
code with `mpo_jax.models`.
"""

from __future__ import annotations

import numpy as np


def rms_norm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope(x, pos, theta, scaling=None):
    """x [T, H, D], pos [T]; HF rotate_half convention."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, d, 2) / d)
    if scaling is not None:
        factor, low, high, orig = scaling
        out = []
        for f in inv:
            wavelen = 2 * np.pi / f
            if wavelen < orig / high:
                out.append(f)
            elif wavelen > orig / low:
                out.append(f / factor)
            else:
                smooth = (orig / wavelen - low) / (high - low)
                out.append((1 - smooth) * f / factor + smooth * f)
        inv = np.array(out)
    ang = pos[:, None] * inv[None]
    cos = np.concatenate([np.cos(ang)] * 2, -1)[:, None]
    sin = np.concatenate([np.sin(ang)] * 2, -1)[:, None]
    half = d // 2
    rot = np.concatenate([-x[..., half:], x[..., :half]], -1)
    return x * cos + rot * sin


def forward_row(p, cfg, tokens):
    """Logits [T, V] of one unpadded sequence. p: flat dict of float64 arrays (in, out)."""
    L, H, K, hd = cfg["layers"], cfg["heads"], cfg["kv_heads"], cfg["head_dim"]
    t = len(tokens)
    x = p["embed"][tokens]
    pos = np.arange(t, dtype=np.float64)
    for layer in range(L):
        h = rms_norm(x, p["layers.attn_norm"][layer], cfg["eps"])
        q = h @ p["layers.q_proj"][layer]
        k = h @ p["layers.k_proj"][layer]
        v = h @ p["layers.v_proj"][layer]
        if "layers.q_bias" in p:
            q, k, v = q + p["layers.q_bias"][layer], k + p["layers.k_bias"][layer], v + p["layers.v_bias"][layer]
        q = rope(q.reshape(t, H, hd), pos, cfg["theta"], cfg.get("scaling"))
        k = rope(k.reshape(t, K, hd), pos, cfg["theta"], cfg.get("scaling"))
        v = v.reshape(t, K, hd)
        out = np.zeros((t, H, hd))
        for head in range(H):
            kv = head // (H // K)
            s = q[:, head] @ k[:, kv].T / np.sqrt(hd)
            s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
            w = np.exp(s - s.max(-1, keepdims=True))
            w /= w.sum(-1, keepdims=True)
            out[:, head] = w @ v[:, kv]
        x = x + out.reshape(t, H * hd) @ p["layers.o_proj"][layer]
        h = rms_norm(x, p["layers.mlp_norm"][layer], cfg["eps"])
        g = h @ p["layers.gate_proj"][layer]
        x = x + (g / (1 + np.exp(-g)) * (h @ p["layers.up_proj"][layer])) @ p["layers.down_proj"][layer]
    x = rms_norm(x, p["final_norm"], cfg["eps"])
    head = p["lm_head"] if "lm_head" in p else p["embed"].T
    return x @ head
