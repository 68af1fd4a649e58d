"""The report's building blocks: a block (heading, text, table, figure), numbers as the
report prints them, and numbered footnotes that put a flag beside the number it affects."""

from dataclasses import dataclass

import numpy as np


@dataclass
class Block:
    kind: str  # "h1" | "h2" | "p" | "table" | "figure"
    text: str = ""
    header: tuple = ()
    rows: tuple = ()
    png: bytes = b""


def num(x: float | None) -> str:
    if x is None or not np.isfinite(x):
        return "n/a"
    return f"{x:.4g}" if 1e-3 <= abs(x) < 1e5 else f"{x:.3g}"


def est(e: dict | None) -> str:
    """An estimate {"value", "lo", "hi"} as "value [lo, hi]"."""
    if not e:
        return ""
    return f"{num(e['value'])} [{num(e['lo'])}, {num(e['hi'])}]"


def times(ratio: float) -> str:
    """A ratio to two significant figures: x2,700, x1.2e6."""
    rounded = float(f"{ratio:.2g}")
    if rounded >= 1e5:
        mantissa, exponent = f"{rounded:.1e}".split("e")
        return f"x{mantissa}e{int(exponent)}"
    return f"x{rounded:,.0f}" if rounded >= 10 else f"x{rounded:g}"


def noted(label: str, flags: list) -> list[str]:
    """Footnote texts of flags (analysis.diagnostics.Flag) on ``label``'s number."""
    return [f"{label}, {flag}" for flag in flags]


class Footnotes:
    """Numbered notes of one table: a cell gets [!1,2], the notes follow the table."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def mark(self, cell: str, texts: list[str]) -> str:
        numbers = []
        for text in texts:
            if text not in self.texts:
                self.texts.append(text)
            numbers.append(self.texts.index(text) + 1)
        if not numbers:
            return cell
        return f"{cell} [!{','.join(map(str, sorted(set(numbers))))}]"

    def blocks(self) -> list[Block]:
        return [Block("p", f"[!{i}] {text}") for i, text in enumerate(self.texts, 1)]
