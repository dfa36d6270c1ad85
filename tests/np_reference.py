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


# --- Hugging Face layouts, read straight from the checkpoint tensors --------------
# Written from the HF modeling equations (nn.Linear: y = x W^T + b; heads are
# contiguous Dh-blocks of the projection's output), not from our loaders.

def _softmax(s):
  w = np.exp(s - s.max(-1, keepdims=True))
  return w / w.sum(-1, keepdims=True)


def _np_ln(x, w, b, eps):
  mu = x.mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * w + b


def hf_llama_logits(t, hf, tokens):
  """LlamaForCausalLM logits for one sequence from HF-named tensors ``t``."""
  t = {k: np.asarray(v, np.float64) for k, v in t.items()}
  lin = lambda x, name: x @ t[f"{name}.weight"].T + t.get(f"{name}.bias", 0.0)
  H, K, D = hf["num_attention_heads"], hf["num_key_value_heads"], hf["hidden_size"]
  dh, L, eps = D // H, len(tokens), hf["rms_norm_eps"]
  x = t["model.embed_tokens.weight"][tokens]
  pos = np.arange(L, dtype=np.float64)
  for i in range(hf["num_hidden_layers"]):
    p = f"model.layers.{i}."
    h = np_rms(x, t[p + "input_layernorm.weight"], eps)
    q, k, v = (lin(h, p + f"self_attn.{c}_proj") for c in "qkv")
    heads = []
    for j in range(H):
      kv = j // (H // K)   # repeat_kv: query head j reads KV head j // group
      qj = np_rope(q[:, j * dh:(j + 1) * dh], pos, hf["rope_theta"])
      kj = np_rope(k[:, kv * dh:(kv + 1) * dh], pos, hf["rope_theta"])
      s = np.where(np.tril(np.ones((L, L))) > 0, qj @ kj.T / np.sqrt(dh), -np.inf)
      heads.append(_softmax(s) @ v[:, kv * dh:(kv + 1) * dh])
    x = x + lin(np.concatenate(heads, -1), p + "self_attn.o_proj")
    h = np_rms(x, t[p + "post_attention_layernorm.weight"], eps)
    g = lin(h, p + "mlp.gate_proj")
    x = x + lin(g / (1 + np.exp(-g)) * lin(h, p + "mlp.up_proj"), p + "mlp.down_proj")
  x = np_rms(x, t["model.norm.weight"], eps)
  head = t["model.embed_tokens.weight"] if hf["tie_word_embeddings"] else t["lm_head.weight"]
  return x @ head.T


def hf_bert_hidden(t, hf, ids, mask):
  """BertModel last hidden states for one sequence (``mask`` 0 = padding)."""
  from scipy.special import erf
  t = {k: np.asarray(v, np.float64) for k, v in t.items()}
  lin = lambda x, name: x @ t[f"{name}.weight"].T + t[f"{name}.bias"]
  ln = lambda x, name: _np_ln(x, t[f"{name}.weight"], t[f"{name}.bias"], hf["layer_norm_eps"])
  H, D, L = hf["num_attention_heads"], hf["hidden_size"], len(ids)
  dh = D // H
  x = (t["embeddings.word_embeddings.weight"][ids] + t["embeddings.position_embeddings.weight"][:L]
       + t["embeddings.token_type_embeddings.weight"][0])
  x = ln(x, "embeddings.LayerNorm")
  for i in range(hf["num_hidden_layers"]):
    p = f"encoder.layer.{i}."
    q, k, v = (lin(x, p + f"attention.self.{c}") for c in ("query", "key", "value"))
    heads = []
    for j in range(H):
      sl = slice(j * dh, (j + 1) * dh)
      s = np.where(np.asarray(mask)[None, :] > 0, q[:, sl] @ k[:, sl].T / np.sqrt(dh), -np.inf)
      heads.append(_softmax(s) @ v[:, sl])
    x = ln(x + lin(np.concatenate(heads, -1), p + "attention.output.dense"),
           p + "attention.output.LayerNorm")
    a = lin(x, p + "intermediate.dense")
    x = ln(x + lin(0.5 * a * (1 + erf(a / np.sqrt(2))), p + "output.dense"), p + "output.LayerNorm")
  return x


def bert_embedding(params, ids, mask, cfg, n_devices=1, drop=None):
  """Sentence embeddings of our BERT layout under TP at ``n_devices``; with ``drop[i]``
  block i is an SPD block: device d (heads [d*H/N, (d+1)*H/N), MLP units likewise) feeds
  its MLP LN1(x + its heads' output), and one sum carries both partials."""
  from scipy.special import erf
  p = to_np(params)
  drop = drop or [False] * cfg.n_layers
  hd, fd, dh = cfg.n_heads // n_devices, cfg.d_ff // n_devices, cfg.head_dim
  ln = lambda x, q: _np_ln(x, q["scale"], q["bias"], cfg.norm_eps)
  out = []
  for seq, m in zip(np.asarray(ids), np.asarray(mask)):
    e = p["embed"]
    x = ln(e["word"][seq] + e["position"][:len(seq)] + e["token_type"][0], e["norm"])
    for i in range(cfg.n_layers):
      b = p[f"block_{i}"]
      a, f = b["attn"], b["mlp"]

      def heads_out(hs):
        o = 0.0
        for j in hs:
          q, k, v = (x @ a[w][:, j] + a[c][j] for w, c in (("wq", "bq"), ("wk", "bk"), ("wv", "bv")))
          s = np.where(m[None, :] > 0, q @ k.T / np.sqrt(dh), -np.inf)
          o = o + (_softmax(s) @ v) @ a["wo"][j]
        return o

      def mlp_out(y, units):
        u = y @ f["w_in"][:, units] + f["b_in"][units]
        return (0.5 * u * (1 + erf(u / np.sqrt(2)))) @ f["w_out"][units]

      o = [heads_out(range(d * hd, (d + 1) * hd)) for d in range(n_devices)]
      units = [np.arange(d * fd, (d + 1) * fd) for d in range(n_devices)]
      y = ln(x + sum(o) + a["bo"], b["attn_norm"])
      if drop[i]:
        z = sum(mlp_out(ln(x + o[d] + a["bo"], b["attn_norm"]), units[d]) for d in range(n_devices))
      else:
        z = sum(mlp_out(y, u) for u in units)
      x = ln(y + z + f["b_out"], b["mlp_norm"])
    pooled = (x * m[:, None]).sum(0) / m.sum()
    out.append(pooled / np.linalg.norm(pooled))
  return np.stack(out)
