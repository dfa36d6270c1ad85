"""CodeX: per-layer codebook encoding of weights and activations, the bitwidth
searches, the uniform-integer (AQT) baseline and the streaming FPGA model.

  python -m experiments.codex                       # the study, quick mode (~1.5 min)
  python -m experiments.codex --full                # the study, six networks (~15 min)
  python -m experiments.codex --model=cnn --dataset=fashion_mnist --board=zc706 \\
      --bits=w4a3,w2a2,w3a3,w4a4                    # compile one configuration
  python -m experiments.codex --model=mlp --dataset=mnist5k --bits=4 --board=zcu102
  python -m experiments.codex --minilm [--full]     # all-MiniLM-L6-v2 on the datapaths
  python -m experiments.codex --classifier=vit --dataset=fashion_mnist   # any classifier, ditto

Study mode writes ``<outdir>/CODEX.md``, ``codex_<mode>.json`` and figures
(the float models are shared with the RAPIDNN study's workdirs). Compile mode
trains (or loads) the float model, encodes it at ``--bits`` (one width for
every layer, or ``wXaY`` per layer, ``a-`` for full-precision activations),
prints the hardware blocks and writes the JSON report to ``--out``.
"""

import os

from absl import app, flags, logging

from accel import study as rapid_study
from accel.codex import encoding, fpga
from accel.codex.encoding import BitConfig
from accel.program import linear_layers, program
from core import data, report
from experiments import compile_flags

_FULL = flags.DEFINE_bool("full", False, "Study: full mode (default: quick).")
_OUTDIR = flags.DEFINE_string("outdir", "results/codex_study", "Where reports and models go.")
_MODEL = flags.DEFINE_enum("model", None, ["mlp", "cnn"], "Compile mode: the network.")
_DATASET = flags.DEFINE_string("dataset", "mnist5k", "Compile mode: the dataset.")
_BOARD = flags.DEFINE_string("board", "zc706", f"Board preset: {sorted(fpga.BOARDS)}.")
_BITS = flags.DEFINE_string("bits", "8", "Compile mode: '4' for every layer, or per layer "
                            "'w4a3,w2a2,...' ('a-': full-precision activations).")
_STEPS = flags.DEFINE_integer("steps", 2000, "Compile mode: float training steps.")
_MINILM = flags.DEFINE_bool("minilm", False, "Study all-MiniLM-L6-v2 on the datapaths instead "
                            "(`make minilm`; quick: 2 widths, no search, ~3 min; --full ~30 min).")
_CLASSIFIER = flags.DEFINE_enum("classifier", None, ["mlp", "cnn", "vit"],
                                "Study this classifier on the datapaths through the interpreter "
                                "(--dataset; e.g. vit on fashion_mnist, ~15 min).")
_OUT = flags.DEFINE_string("out", None, "Compile mode: the JSON report (default "
                           "<outdir>/<dataset>_<model>_<board>.json).")


def compile_one() -> None:
  fpga.board(_BOARD.value)             # an unknown board fails before any training
  ds = data.load(_DATASET.value)
  fit, x_val, y_val = data.holdout(ds, min(500, len(ds.x_train) // 5))
  workdir = os.path.join(_OUTDIR.value, "models", f"{ds.name}_{_MODEL.value}_{_STEPS.value}")
  params, mcfg = rapid_study.train_float(fit, _MODEL.value, _STEPS.value,
                                         rapid_study.GridPlan(runs=()), workdir)
  ops = program(_MODEL.value, mcfg)
  bits = BitConfig.parse(_BITS.value, len(linear_layers(ops)))
  design = fpga.compile_design(ops, ds.input_shape, params, bits, _BOARD.value)
  from accel import rapidnn
  acts = rapidnn.layer_activations(params, ops, fit.x_train[:512])
  bank = encoding.CodebookBank(params, ops, acts)
  logits = encoding.emulate(bank.codebook(bits), ds.x_test, ops)
  acc = 100 * float((logits.argmax(-1) == ds.y_test).mean())
  print(f"{ds.name} {_MODEL.value} `{bits.label()}` on {fpga.board(_BOARD.value).name}: "
        f"test accuracy {acc:.2f}% (encoded datapath, no fine-tuning)")
  for b in design.blocks:
    if b.kind == "mac":
      print(f"  {b.name:16s} w{b.w_bits}a{b.a_bits} macs={b.macs:,} lanes={b.lanes:,} "
            f"dsp={b.dsp} lut={b.lut:,} bram36={b.bram36} cycles={b.cycles:,}"
            f"{' (kernel spilled to DRAM)' if b.spilled else ''}")
    else:
      print(f"  {b.name:16s} {b.kind}" + (f": {b.comparators} comparators per value"
                                          if b.comparators else ""))
  print(f"  II {design.ii_cycles} cycles: {design.images_per_s:,.0f} images/s (model), "
        f"{design.bram36} BRAM36, {design.dsp} DSP, {design.lut:,} LUT, "
        f"{design.energy_uj_per_image:.2f} uJ/image")
  out = _OUT.value or os.path.join(_OUTDIR.value,
                                   f"{ds.name}_{_MODEL.value}_{_BOARD.value}.json")
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "w") as f:
    f.write(design.to_json())
  print(f"wrote {out}")


def classifier_study() -> None:
  import json
  from accel import classifiers
  plan = classifiers.ClassifierPlan(dataset=_DATASET.value, model=_CLASSIFIER.value)
  workdir = os.path.join(_OUTDIR.value, "models", f"{plan.dataset}_{plan.model}_{plan.steps}")
  res = classifiers.run(plan, workdir)
  out = os.path.join(_OUTDIR.value, f"codex_{plan.dataset}_{plan.model}.json")
  with open(out, "w") as f:
    json.dump(res, f, indent=1, default=float)
  print(f"wrote {out}")


def minilm_study() -> None:
  import json
  from accel import minilm, minilm_section
  plan = minilm.MiniLMPlan() if _FULL.value else minilm.MiniLMPlan.quick()
  res = minilm.run(plan)
  os.makedirs(_OUTDIR.value, exist_ok=True)
  with open(os.path.join(_OUTDIR.value, f"codex_minilm_{'full' if _FULL.value else 'quick'}.json"),
            "w") as f:
    json.dump(res, f, indent=1, default=float)
  sec = minilm_section.render(res)
  out = os.path.join(_OUTDIR.value, "CODEX_MINILM.md")
  with open(out, "w") as f:
    f.write(f"## {sec.title}\n\n{sec.body}\n")
  print(sec.body)
  print(f"wrote {out}")


def main(argv):
  del argv
  compile_flags.setup()
  logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint at INFO
  if _MODEL.value:
    try:
      compile_one()
    except ValueError as e:
      raise app.UsageError(str(e)) from e
    return
  if _MINILM.value:
    minilm_study()
    return
  if _CLASSIFIER.value:
    classifier_study()
    return
  from accel.codex import section
  report.write_report_or_exit(f"{_OUTDIR.value}/CODEX.md", [("codex", section.section)],
                              quick=not _FULL.value, outdir=_OUTDIR.value, echo=True)


if __name__ == "__main__":
  app.run(main)
