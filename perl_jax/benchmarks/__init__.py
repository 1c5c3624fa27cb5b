"""Benchmark scripts: each prints figures and asserts nothing (see BUILD_NOTES.md)."""

from typing import Any


def _row(cells: list[Any], widths: list[int]) -> str:
  return "  ".join(str(c).rjust(w) if i else str(c).ljust(w)
                   for i, (c, w) in enumerate(zip(cells, widths)))


def print_table(title: str, header: list[str], rows: list[list[Any]]) -> None:
  """A plain-text table: first column left-aligned, the rest right-aligned."""
  widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
  print(f"\n{title}")
  print(_row(header, widths))
  print("  ".join("-" * w for w in widths))
  for r in rows:
    print(_row(r, widths))
