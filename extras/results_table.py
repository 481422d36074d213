"""
extras/results_table.py: results printed as a markdown table.

Why it exists: eval.py's command, the BBH subtasks of extras/benchmarks.py, demo.py and tools/ all
print their numbers the same way, so that a run's output pastes into an issue or a README as it
is. A learner needs only the numbers; how they are laid out is here, in a file that imports nothing
of the project (so any of them may import it without an import cycle).

What it holds: `markdown_table(results, title)`: models (or settings) as rows, metrics as columns.
"""
from __future__ import annotations


def markdown_table(results: dict, title: str = "") -> str:
    """Models as rows, metrics as columns: numbers to 4 decimals, text as it is, '-' where a metric
    is missing."""
    cols = list(dict.fromkeys(k for r in results.values() for k in r))
    head = f"model ({title})" if title else "model"
    lines = [f"| {head} | " + " | ".join(cols) + " |", "| --- |" + " --- |" * len(cols)]
    for name, r in results.items():
        cells = ("-" if c not in r else r[c] if isinstance(r[c], str) else f"{r[c]:.4f}"
                 for c in cols)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
