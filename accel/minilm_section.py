"""The MiniLM-on-the-datapaths study (``accel.minilm``) as a report section:
records in, Markdown out."""

from __future__ import annotations

from core import report


def _row(label: str, r: dict) -> list:
  return [label, f"{r['weights']:.2f} / {r['activations']:.2f}",
          f"{r['cos']:.4f} ± {r['cos_se']:.4f} (min {r['cos_min']:.3f})",
          f"{100 * r['top1']:.1f} ± {100 * r['top1_se']:.1f}"]


def smallest_width(rows: list[dict], cos: float) -> int | None:
  """The smallest uniform width whose mean test cosine reaches ``cos``, provided
  every larger width measured reaches it too (a budget holds only if it holds
  above it)."""
  ok = None
  for r in sorted(rows, key=lambda r: -r["bits"]):
    if r["cos"] < cos:
      break
    ok = r["bits"]
  return ok


def render(res: dict) -> report.Section:
  n = res["uniform"][0]["n"]
  parts = [
      f"all-MiniLM-L6-v2 with **every linear op of its encoder on the datapath**: "
      f"{res['ops']} ops ({res['activation_ops']} of them attention's activation x activation "
      f"products), {res['multiplies']['total']:,} multiplies per calibration batch, "
      f"{res['multiplies']['datapath']:,} on the datapath and {res['multiplies']['float']:,} in "
      f"float (counted from the jaxpr, `accel.codebooks.accounting`). Post-training: codebooks "
      f"fitted on training-book verses in {res['fit_s']:.0f} s; scored on {n} held-out-book "
      "verses against the float model (cosine of sentence embeddings, mean ± SE; top-1 "
      "retrieval agreement in %, ± binomial SE). Bits: average width of weights / of "
      "activation operands (float operands count 16)."]
  rows = [_row(f"CodeX {r['bits']}-bit, {r['scope']}", r) for r in res["uniform"]]
  rows += [_row(f"AQT int{r['bits']}, per-token / per-channel scales", r) for r in res["aqt"]]
  if "search" in res:
    s = res["search"]
    rows.append(_row(f"CodeX searched (greedy, {s['evaluations']} evaluations, "
                     f"{s['wall_s']:.0f} s)", s))
  parts.append(report.markdown_table(["datapath", "bits W / A", "cosine to float",
                                "top-1 agreement %"], rows))
  both = [r for r in res["uniform"] if r["scope"] == "weights+activations"]
  lines = []
  top = lambda rows: f"> {max(r['bits'] for r in rows)}"
  for target in (0.99, 0.995):
    ours, aqt = smallest_width(both, target), smallest_width(res["aqt"], target)
    lines.append(f"cosine >= {target}: CodeX uniform {ours or top(both)} bits, "
                 f"AQT {aqt or top(res['aqt'])} bits")
  parts.append("Smallest uniform width (weights and activations) reaching a mean test cosine, "
               "every wider setting passing too: " + "; ".join(lines) + ".")
  if "search" in res:
    s = res["search"]
    met = s["cos"] >= 0.99 and s["top1"] >= 0.90 and max(s["weights"], s["activations"]) <= 4
    parts.append(f"Target (<= 4 average bits, cosine >= 0.99, top-1 agreement >= 90%): "
                 f"**{'met' if met else 'missed'}** by the searched configuration (chosen on "
                 f"validation verses, validation cosine {s['val_cos']:.4f}).")
  t = res["throughput"]
  parts.append(f"Emulator throughput ({t['bits']}-bit, 2 CPU cores): "
               f"{t['emulator_warm']:.1f} sentences/s warm, {t['emulator_cold']:.1f} cold "
               f"(compile included) vs the float model's {t['float_warm']:.1f} / "
               f"{t['float_cold']:.1f}; the emulator encodes every weight and activation on "
               "each call.")
  return report.Section("CodeX / RAPIDNN datapaths on all-MiniLM-L6-v2 (any JAX model)",
                        "\n\n".join(parts))
