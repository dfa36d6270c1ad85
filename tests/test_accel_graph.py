"""accel.graph finds every linear op of a model from its jaxpr: multiplies
against hand counts (MLP, CNN, the LM's config formula), attention's two
activation x activation products per block, scans counted per iteration with
the weight flag carried through the loop, stable names, a user's own model,
and a while loop refused."""

import jax
import jax.numpy as jnp
import pytest

from accel import graph
from core.models import cnn, lm, mlp


def test_mlp_and_cnn_multiplies_equal_hand_counts():
  c = mlp.MLPConfig(input_shape=(8, 8, 1), hidden=(16, 12), num_classes=3)
  f = lambda p, x: mlp.apply(p, x, c)
  p, x = mlp.init(jax.random.key(0), c), jnp.zeros((5, 8, 8, 1))
  ops = graph.linear_ops(f, p, x)
  assert [o.multiplies for o in ops] == [5 * 64 * 16, 5 * 16 * 12, 5 * 12 * 3]
  assert all(o.weight for o in ops) and ops[0].name == "000_dot_5x64_64x16"
  assert graph.linear_ops(f, p, x) == ops                      # stable across traces
  cc = cnn.CNNConfig()
  ops = graph.linear_ops(lambda p, x: cnn.apply(p, x, cc), cnn.init(jax.random.key(0), cc),
                         jnp.zeros((2, 28, 28, 1)))
  assert [o.primitive for o in ops] == ["conv_general_dilated"] * 2 + ["dot_general"] * 2
  # per output element: window x input channels
  assert [o.multiplies for o in ops[:2]] == [2 * 28 * 28 * 16 * 9 * 1, 2 * 14 * 14 * 32 * 9 * 16]


def test_lm_attention_products_are_activation_by_activation():
  cfg = lm.LMConfig(vocab_size=64, d_model=32, n_heads=4, n_kv_heads=2, d_ff=48, n_layers=3,
                    max_seq_len=16)
  b, l = 2, 16
  ops = graph.linear_ops(lambda p, t: lm.apply(p, t, cfg=cfg), lm.init(jax.random.key(0), cfg),
                         jnp.zeros((b, l), jnp.int32))
  act = [o for o in ops if not o.weight]
  assert len(act) == 2 * cfg.n_layers                          # Q.K^T and P.V per block
  hd = cfg.d_model // cfg.n_heads
  assert all(o.multiplies == b * cfg.n_heads * l * l * hd for o in act)
  d, f, dkv = cfg.d_model, cfg.d_ff, cfg.n_kv_heads * hd
  per_token = cfg.n_layers * (2 * d * d + 2 * d * dkv + 3 * d * f) + d * cfg.vocab_size
  assert graph.multiplies(ops) == {"total": b * l * per_token + 2 * cfg.n_layers * b * cfg.n_heads
                                   * l * l * hd, "weight": b * l * per_token,
                                   "activation": 2 * cfg.n_layers * b * cfg.n_heads * l * l * hd}


def test_a_users_scanned_model_and_a_while_loop():
  # Not a core.models model: stacked layers scanned, a self-similarity product.
  def apply(p, x):
    def layer(h, w):
      return jnp.tanh(h @ w), None
    h = jax.lax.scan(layer, x, p["stack"])[0]
    return (h @ h.T) @ p["out"]
  p = {"stack": jnp.ones((4, 6, 6)), "out": jnp.ones((3, 2))}
  ops = graph.linear_ops(apply, p, jnp.ones((3, 6)))
  assert [(o.weight, o.multiplies) for o in ops] == [(True, 4 * 3 * 6 * 6), (False, 3 * 3 * 6),
                                                      (True, 3 * 3 * 2)]
  with pytest.raises(ValueError, match="while loop"):
    graph.linear_ops(lambda p, x: jax.lax.while_loop(lambda c: c.sum() < 9, lambda c: c @ p, x),
                     jnp.eye(2), jnp.ones((2, 2)))


def test_bert_with_unused_params_flags_its_attention_products():
  # encode() leaves the pooler's weights unused: the params still line up with the inputs
  from core.models import bert
  cfg = bert.BertConfig(vocab_size=50, d_model=24, n_layers=2, n_heads=4, d_ff=40,
                        max_positions=16)
  mask = jnp.ones((2, 8))
  ops = graph.linear_ops(lambda p, ids: bert.encode(p, ids, mask, cfg),
                         bert.init(jax.random.key(0), cfg), jnp.zeros((2, 8), jnp.int32))
  act = [o for o in ops if not o.weight]
  assert len(act) == 2 * cfg.n_layers and all(o.multiplies == 2 * 4 * 8 * 8 * 6 for o in act)
