"""Independent NumPy (float64) references for the LM: plain loops over heads
and devices, written from the equations rather than from the JAX code."""

import jax
import numpy as np


def np_rms(x, s, eps=1e-6):
  return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * s


def np_rope(x_LxDh, positions, theta=10_000.0):
  dh = x_LxDh.shape[-1]
  half = dh // 2
  freqs = theta ** (-np.arange(half) * 2.0 / dh)
  ang = positions[:, None] * freqs[None]
  x1, x2 = x_LxDh[:, :half], x_LxDh[:, half:]
  return np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang),
                         x2 * np.cos(ang) + x1 * np.sin(ang)], -1)


def to_np(params):
  return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)


def attention_heads(b, h, heads, cfg):
  """Sum over ``heads`` of one sequence's causal attention out-projection."""
  L = len(h)
  pos = np.arange(L, dtype=np.float64)
  out = np.zeros((L, cfg.d_model))
  group = cfg.n_heads // cfg.kv_heads
  for head in heads:
    kvh = head // group
    q = np_rope(h @ b["attn"]["wq"][:, head], pos)
    k = np_rope(h @ b["attn"]["wk"][:, kvh], pos)
    v = h @ b["attn"]["wv"][:, kvh]
    s = q @ k.T / np.sqrt(cfg.head_dim)
    s = np.where(np.tril(np.ones((L, L))) > 0, s, -np.inf)
    w = np.exp(s - s.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    out += (w @ v) @ b["attn"]["wo"][head]
  return out


def mlp_units(b, m, units):
  g = m @ b["mlp"]["w_gate"][:, units]
  return ((g / (1 + np.exp(-g))) * (m @ b["mlp"]["w_up"][:, units])) @ b["mlp"]["w_down"][units]


def lm_logits(params, tokens, cfg, n_devices=1, drop=None):
  """Logits of the LM; with ``drop[i]`` block i is an SPD block emulated per
  device: device d owns heads [d*H/N, (d+1)*H/N) and MLP units likewise."""
  p = to_np(params)
  drop = drop or [False] * cfg.n_layers
  hd, fd = cfg.n_heads // n_devices, cfg.d_ff // n_devices
  out = []
  for seq in tokens:
    x = p["embed"]["embedding"][seq]
    for i in range(cfg.n_layers):
      b = p[f"block_{i}"]
      h = np_rms(x, b["attn_norm"]["scale"])
      o = [attention_heads(b, h, range(d * hd, (d + 1) * hd), cfg) for d in range(n_devices)]
      units = [np.arange(d * fd, (d + 1) * fd) for d in range(n_devices)]
      if drop[i]:
        z = [mlp_units(b, np_rms(x + o[d], b["mlp_norm"]["scale"]), units[d])
             for d in range(n_devices)]
        x = x + sum(o[d] + z[d] for d in range(n_devices))
      else:
        y = x + sum(o)
        x = y + sum(mlp_units(b, np_rms(y, b["mlp_norm"]["scale"]), u) for u in units)
    out.append(np_rms(x, p["final_norm"]["scale"]) @ p["unembed"]["kernel"])
  return np.stack(out)
