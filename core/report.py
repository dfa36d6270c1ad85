"""Markdown report assembly: tables, PNG plots, and ``results/REPORT.md``.

Each method contributes a ``Section`` from a function ``(quick, outdir) ->
Section``; ``write_report`` runs them in order and writes one Markdown file,
so a failing section is reported in place instead of losing the others.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import time
import traceback
from typing import Callable, Sequence

import matplotlib
import numpy as np

matplotlib.use("Agg")  # headless: plots go to PNG files
import matplotlib.pyplot as plt  # noqa: E402


@dataclasses.dataclass
class Section:
  title: str
  body: str  # Markdown; figures are referenced by relative path inside it


SectionFn = Callable[[bool, str], Section]


def fmt(v, digits: int = 4) -> str:
  if isinstance(v, float):
    return f"{v:.{digits}g}" if abs(v) < 1e3 else f"{v:,.0f}"
  if isinstance(v, int):
    return f"{v:,}"
  return str(v)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence], digits: int = 4) -> str:
  lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
  lines += ["| " + " | ".join(fmt(v, digits) for v in row) + " |" for row in rows]
  return "\n".join(lines)


def line_plot(path: str, series: dict[str, tuple[Sequence[float], ...]], *,
              xlabel: str, ylabel: str, title: str, logy: bool = False,
              logx: bool = False) -> str:
  """Writes a PNG with one line per series, each (x, y) or (x, y, yerr) where
  yerr draws error bars (e.g. a standard error); returns ``path``."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
  for name, (x, y, *err) in series.items():
    if err:
      ax.errorbar(x, y, yerr=err[0], label=name, marker="o", markersize=3, capsize=2)
    else:
      ax.plot(x, y, label=name, marker="o" if len(x) < 30 else None, markersize=3)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  if logy:
    ax.set_yscale("log")
  if logx:
    ax.set_xscale("log")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path


def heatmap(path: str, values, row_labels: Sequence, col_labels: Sequence, *, xlabel: str,
            ylabel: str, title: str, fmt_cell: str = "{:.1f}", cmap: str = "viridis") -> str:
  """Writes a PNG heatmap of ``values`` (rows x cols) with each cell annotated."""
  values = np.asarray(values, float)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig, ax = plt.subplots(figsize=(max(5.0, 1.5 + 0.8 * len(col_labels)),
                                  max(3.5, 1.0 + 0.6 * len(row_labels))), dpi=110)
  im = ax.imshow(values, cmap=cmap, aspect="auto", origin="lower")
  ax.set_xticks(range(len(col_labels)), [str(c) for c in col_labels])
  ax.set_yticks(range(len(row_labels)), [str(r) for r in row_labels])
  mid = np.nanmean(values)
  for i in range(values.shape[0]):
    for j in range(values.shape[1]):
      ax.text(j, i, fmt_cell.format(values[i, j]), ha="center", va="center", fontsize=7,
              color="white" if values[i, j] < mid else "black")
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title, fontsize=9)
  fig.colorbar(im, ax=ax)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path


def write_report(path: str, section_fns: Sequence[tuple[str, SectionFn]], *, quick: bool,
                 outdir: str) -> list[str]:
  """Runs each section and writes the report; returns the names that failed."""
  parts, failed = [], []
  for name, fn in section_fns:
    t0 = time.perf_counter()
    try:
      sec = fn(quick, outdir)
      parts.append(f"## {sec.title}\n\n{sec.body}\n\n_Section time: "
                   f"{time.perf_counter() - t0:.0f} s._\n")
    except Exception:  # a failing section is reported, the others still run
      failed.append(name)
      parts.append(f"## {name} (FAILED)\n\n```\n{traceback.format_exc()[-3000:]}\n```\n")
  header = (f"# Results report\n\nGenerated {datetime.datetime.now():%Y-%m-%d %H:%M} on "
            f"{platform.node()} ({os.cpu_count()} CPUs), mode: "
            f"{'quick' if quick else 'full'}. Numbers from a quick run are for "
            f"smoke-checking the pipeline; docs/RESULTS.md holds the measured ones.\n")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(header + "\n" + "\n".join(parts))
  os.replace(tmp, path)
  return failed


def write_report_or_exit(path: str, section_fns: Sequence[tuple[str, SectionFn]], *, quick: bool,
                         outdir: str, echo: bool = False) -> None:
  """What a report binary does: ``write_report``, print the path (``echo``: the
  report itself), and exit non-zero if a section failed."""
  failed = write_report(path, section_fns, quick=quick, outdir=outdir)
  if echo:
    with open(path) as f:
      print(f.read())
  print(f"wrote {path}" + (f"; FAILED sections: {failed}" if failed else ""))
  if failed:
    raise SystemExit(1)
