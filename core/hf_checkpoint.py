"""Hugging Face safetensors checkpoints <-> our param pytrees, for two families:

- ``bert``: ``BertModel`` keys (``embeddings.word_embeddings.weight``,
  ``encoder.layer.N.attention.self.query.weight``, ...; an optional ``bert.``
  prefix as in ``BertForMaskedLM``) onto ``core.models.bert``;
- ``llama``: LLaMA keys (``model.layers.N.self_attn.q_proj.weight``, ...) onto
  the LLaMA-style ``core.models.lm``. HF-format LLaMA checkpoints already use
  the rotate-half RoPE convention (their conversion script permuted Meta's q/k
  weights), which is ours, so q/k are only transposed and reshaped.

Every key's target path and layout is listed once (``_bert_keys``,
``_llama_keys``); loading checks that the file holds exactly those keys (a
clear error names any missing, unexpected or wrongly shaped one) and reads
tensors with the ``safetensors`` NumPy API (no torch; bf16 via ml_dtypes).
HF ``nn.Linear`` weights are (out, in); ours are (in, out) with heads explicit.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Any, Callable

import jax
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from core.models import bert, lm

# How an HF tensor becomes ours: 'copy', 'linear' (transpose), 'heads_in'
# ((H*Dh, D) -> (D, H, Dh)), 'heads_out' ((D, H*Dh) -> (H, Dh, D)), 'head_bias'
# ((H*Dh,) -> (H, Dh)).
LAYOUTS = ("copy", "linear", "heads_in", "heads_out", "head_bias")


@dataclasses.dataclass(frozen=True)
class Key:
  hf: str
  path: tuple[str, ...]
  layout: str = "copy"


def _bert_keys(cfg: bert.BertConfig) -> list[Key]:
  keys = [Key("embeddings.word_embeddings.weight", ("embed", "word")),
          Key("embeddings.position_embeddings.weight", ("embed", "position")),
          Key("embeddings.token_type_embeddings.weight", ("embed", "token_type")),
          Key("embeddings.LayerNorm.weight", ("embed", "norm", "scale")),
          Key("embeddings.LayerNorm.bias", ("embed", "norm", "bias"))]
  for i in range(cfg.n_layers):
    h, b = f"encoder.layer.{i}.", bert.block_key(i)
    for hf_name, ours in (("query", "q"), ("key", "k"), ("value", "v")):
      keys += [Key(f"{h}attention.self.{hf_name}.weight", (b, "attn", f"w{ours}"), "heads_in"),
               Key(f"{h}attention.self.{hf_name}.bias", (b, "attn", f"b{ours}"), "head_bias")]
    keys += [Key(f"{h}attention.output.dense.weight", (b, "attn", "wo"), "heads_out"),
             Key(f"{h}attention.output.dense.bias", (b, "attn", "bo")),
             Key(f"{h}attention.output.LayerNorm.weight", (b, "attn_norm", "scale")),
             Key(f"{h}attention.output.LayerNorm.bias", (b, "attn_norm", "bias")),
             Key(f"{h}intermediate.dense.weight", (b, "mlp", "w_in"), "linear"),
             Key(f"{h}intermediate.dense.bias", (b, "mlp", "b_in")),
             Key(f"{h}output.dense.weight", (b, "mlp", "w_out"), "linear"),
             Key(f"{h}output.dense.bias", (b, "mlp", "b_out")),
             Key(f"{h}output.LayerNorm.weight", (b, "mlp_norm", "scale")),
             Key(f"{h}output.LayerNorm.bias", (b, "mlp_norm", "bias"))]
  if cfg.pooler:
    keys += [Key("pooler.dense.weight", ("pooler", "kernel"), "linear"),
             Key("pooler.dense.bias", ("pooler", "bias"))]
  return keys


def _llama_keys(cfg: lm.LMConfig) -> list[Key]:
  keys = [Key("model.embed_tokens.weight", ("embed", "embedding")),
          Key("model.norm.weight", ("final_norm", "scale"))]
  if not cfg.tie_embeddings:
    keys.append(Key("lm_head.weight", ("unembed", "kernel"), "linear"))
  for i in range(cfg.n_layers):
    h, b = f"model.layers.{i}.", lm.block_key(i)
    keys += [Key(f"{h}input_layernorm.weight", (b, "attn_norm", "scale")),
             Key(f"{h}post_attention_layernorm.weight", (b, "mlp_norm", "scale")),
             Key(f"{h}self_attn.o_proj.weight", (b, "attn", "wo"), "heads_out"),
             Key(f"{h}mlp.gate_proj.weight", (b, "mlp", "w_gate"), "linear"),
             Key(f"{h}mlp.up_proj.weight", (b, "mlp", "w_up"), "linear"),
             Key(f"{h}mlp.down_proj.weight", (b, "mlp", "w_down"), "linear")]
    keys += [Key(f"{h}self_attn.{c}_proj.weight", (b, "attn", f"w{c}"), "heads_in") for c in "qkv"]
    if cfg.use_bias:
      keys += [Key(f"{h}self_attn.{c}_proj.bias", (b, "attn", f"b{c}"), "head_bias") for c in "qkv"]
      keys += [Key(f"{h}self_attn.o_proj.bias", (b, "attn", "bo")),
               Key(f"{h}mlp.gate_proj.bias", (b, "mlp", "b_gate")),
               Key(f"{h}mlp.up_proj.bias", (b, "mlp", "b_up")),
               Key(f"{h}mlp.down_proj.bias", (b, "mlp", "b_down"))]
  return keys


def _bert_config(hf: dict) -> bert.BertConfig:
  if hf.get("hidden_act", "gelu") != "gelu":
    raise ValueError(f"bert: hidden_act {hf['hidden_act']!r} is not supported (exact 'gelu' only)")
  if hf.get("position_embedding_type", "absolute") != "absolute":
    raise ValueError(f"bert: position_embedding_type {hf['position_embedding_type']!r} is not "
                     "supported (absolute only)")
  return bert.BertConfig(
      vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
      n_heads=hf["num_attention_heads"], d_ff=hf["intermediate_size"],
      max_positions=hf["max_position_embeddings"], type_vocab_size=hf.get("type_vocab_size", 2),
      norm_eps=hf.get("layer_norm_eps", 1e-12))


def _bert_hf_config(cfg: bert.BertConfig) -> dict:
  return {"architectures": ["BertModel"], "model_type": "bert", "vocab_size": cfg.vocab_size,
          "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers,
          "num_attention_heads": cfg.n_heads, "intermediate_size": cfg.d_ff,
          "max_position_embeddings": cfg.max_positions, "type_vocab_size": cfg.type_vocab_size,
          "layer_norm_eps": cfg.norm_eps, "hidden_act": "gelu",
          "position_embedding_type": "absolute"}


def _llama_config(hf: dict) -> lm.LMConfig:
  if hf.get("hidden_act", "silu") != "silu":
    raise ValueError(f"llama: hidden_act {hf['hidden_act']!r} is not supported (SwiGLU 'silu' only)")
  if hf.get("rope_scaling"):
    raise ValueError(f"llama: rope_scaling {hf['rope_scaling']} is not supported")
  if hf.get("attention_bias", False) != hf.get("mlp_bias", hf.get("attention_bias", False)):
    raise ValueError("llama: attention_bias and mlp_bias must agree (one use_bias flag here)")
  heads = hf["num_attention_heads"]
  if hf.get("head_dim") not in (None, hf["hidden_size"] // heads):
    raise ValueError(f"llama: head_dim {hf['head_dim']} != hidden_size / heads is not supported")
  kv = hf.get("num_key_value_heads", heads)
  return lm.LMConfig(
      vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
      n_heads=heads, n_kv_heads=None if kv == heads else kv, d_ff=hf["intermediate_size"],
      max_seq_len=hf["max_position_embeddings"], rope_theta=float(hf.get("rope_theta", 10_000.0)),
      norm_eps=hf.get("rms_norm_eps", 1e-6), use_bias=hf.get("attention_bias", False),
      tie_embeddings=hf.get("tie_word_embeddings", False))


def _llama_hf_config(cfg: lm.LMConfig) -> dict:
  return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
          "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
          "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
          "num_key_value_heads": cfg.kv_heads, "intermediate_size": cfg.d_ff,
          "max_position_embeddings": cfg.max_seq_len, "rope_theta": cfg.rope_theta,
          "rms_norm_eps": cfg.norm_eps, "attention_bias": cfg.use_bias,
          "mlp_bias": cfg.use_bias, "tie_word_embeddings": cfg.tie_embeddings,
          "hidden_act": "silu"}


@dataclasses.dataclass(frozen=True)
class Family:
  init: Callable[[jax.Array, Any], dict]
  keys: Callable[[Any], list[Key]]
  config_from_hf: Callable[[dict], Any]
  config_to_hf: Callable[[Any], dict]
  ignored: tuple[str, ...] = ()      # key endings of buffers HF saves that carry no weights
  prefixes: tuple[str, ...] = ()     # stripped from keys (models with a task head)


FAMILIES = {
    "bert": Family(bert.init, _bert_keys, _bert_config, _bert_hf_config,
                   ignored=("embeddings.position_ids",), prefixes=("bert.",)),
    "llama": Family(lm.init, _llama_keys, _llama_config, _llama_hf_config,
                    ignored=(".rotary_emb.inv_freq",)),
}


def _family(name: str) -> Family:
  if name not in FAMILIES:
    raise ValueError(f"unknown checkpoint family {name!r}; choose one of {', '.join(FAMILIES)}")
  return FAMILIES[name]


def _to_ours(x: np.ndarray, layout: str, shape: tuple[int, ...]) -> np.ndarray:
  if layout == "copy":
    return x
  if layout == "head_bias":
    return x.reshape(shape)
  return x.T.reshape(shape)   # HF (out, in) -> ours (in, ..., out), heads split out


def _to_hf_layout(x: np.ndarray, layout: str) -> np.ndarray:
  """The inverse of ``_to_ours``."""
  if layout == "copy":
    return x
  if layout == "head_bias":
    return x.reshape(-1)
  if layout == "heads_out":   # ours (H, Dh, D)
    return x.reshape(-1, x.shape[-1]).T
  return x.reshape(x.shape[0], -1).T   # linear (in, out), heads_in (D, H, Dh)


def _hf_shape(layout: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  """The shape the HF tensor must have for our leaf of ``shape``."""
  if layout == "copy":
    return shape
  if layout == "linear":
    return shape[::-1]
  if layout == "heads_in":       # ours (D, H, Dh)
    return (shape[1] * shape[2], shape[0])
  if layout == "heads_out":      # ours (H, Dh, D)
    return (shape[2], shape[0] * shape[1])
  return (shape[0] * shape[1],)  # head_bias: ours (H, Dh)


def _leaf_shapes(family: Family, cfg: Any) -> dict[tuple[str, ...], tuple[int, ...]]:
  tree = jax.eval_shape(family.init, jax.random.key(0), cfg)
  return {tuple(k.key for k in path): tuple(v.shape)
          for path, v in jax.tree_util.tree_leaves_with_path(tree)}


def from_hf(tensors: dict[str, np.ndarray], cfg: Any, family: str, *,
            strict: bool = True) -> dict:
  """Our param pytree from HF-named tensors. Raises ValueError naming missing,
  unexpected (``strict``; otherwise ignored) or wrongly shaped keys."""
  fam = _family(family)
  tensors = dict(tensors)
  for prefix in fam.prefixes:   # e.g. BertForMaskedLM's 'bert.' (its 'cls.' head is unexpected)
    tensors = {k.removeprefix(prefix): v for k, v in tensors.items()}
  if family == "llama" and cfg.tie_embeddings and "lm_head.weight" in tensors:
    # Some tied checkpoints store the head anyway; it must be the embedding itself.
    head = tensors.pop("lm_head.weight")
    if not np.array_equal(head, tensors.get("model.embed_tokens.weight")):
      raise ValueError("llama checkpoint: tie_word_embeddings is set but lm_head.weight differs "
                       "from model.embed_tokens.weight")
  keys = fam.keys(cfg)
  shapes = _leaf_shapes(fam, cfg)
  wanted = {k.hf for k in keys}
  present = {k for k in tensors if not any(k.endswith(i) for i in fam.ignored)}
  missing, unexpected = sorted(wanted - present), sorted(present - wanted)
  if missing:
    raise ValueError(f"{family} checkpoint lacks {len(missing)} key(s) the config needs: "
                     f"{missing[:6]}{' ...' if len(missing) > 6 else ''}")
  if unexpected and strict:
    raise ValueError(f"{family} checkpoint has {len(unexpected)} key(s) this model does not use: "
                     f"{unexpected[:6]}{' ...' if len(unexpected) > 6 else ''} (a different "
                     "config, or a task head: pass strict=False to ignore them)")
  params: dict = {}
  for k in keys:
    want = _hf_shape(k.layout, shapes[k.path])
    x = np.asarray(tensors[k.hf])
    if tuple(x.shape) != want:
      raise ValueError(f"{family} key {k.hf!r} has shape {tuple(x.shape)}; the config needs "
                       f"{want} (for our {'/'.join(k.path)} of shape {shapes[k.path]})")
    node = params
    for name in k.path[:-1]:
      node = node.setdefault(name, {})
    node[k.path[-1]] = _to_ours(x.astype(np.float32), k.layout, shapes[k.path])
  return params


def to_hf(params: dict, cfg: Any, family: str) -> dict[str, np.ndarray]:
  """HF-named NumPy tensors from our params (the inverse of ``from_hf``)."""
  out = {}
  for k in _family(family).keys(cfg):
    leaf = params
    for name in k.path:
      leaf = leaf[name]
    out[k.hf] = np.ascontiguousarray(_to_hf_layout(np.asarray(leaf), k.layout))
  return out


def save(directory: str, params: dict, cfg: Any, family: str) -> str:
  """Writes ``config.json`` and ``model.safetensors`` in HF layout; returns the directory."""
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(_family(family).config_to_hf(cfg), f, indent=1)
  save_file(to_hf(params, cfg, family), os.path.join(directory, "model.safetensors"))
  return directory


def read_tensors(directory: str) -> dict[str, np.ndarray]:
  """Every tensor of ``model.safetensors`` or of the shards a
  ``model.safetensors.index.json`` lists, as NumPy arrays."""
  index = os.path.join(directory, "model.safetensors.index.json")
  if os.path.exists(index):
    with open(index) as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
  else:
    files = [os.path.basename(p) for p in glob.glob(os.path.join(directory, "*.safetensors"))]
  if not files:
    raise FileNotFoundError(f"no .safetensors file under {directory}")
  tensors = {}
  for name in files:
    with safe_open(os.path.join(directory, name), framework="numpy") as f:
      for key in f.keys():
        tensors[key] = f.get_tensor(key)
  return tensors


def load(directory: str, family: str, *, strict: bool = True) -> tuple[dict, Any]:
  """(params, config) from an HF model directory (``config.json`` + safetensors)."""
  fam = _family(family)
  cfg_path = os.path.join(directory, "config.json")
  if not os.path.exists(cfg_path):
    raise FileNotFoundError(f"no config.json under {directory}")
  with open(cfg_path) as f:
    cfg = fam.config_from_hf(json.load(f))
  return from_hf(read_tensors(directory), cfg, family, strict=strict), cfg
