"""extras/format_error.py: the one error the file readers in extras/ raise.

Why it exists: model.py and tokenizer.py import the readers in extras/, so the readers cannot import
them back for CheckpointError and TokenizerError (that would be an import cycle). They raise
FormatError instead, a ValueError whose message names the file and the fix, and the core turns it
into its own error with the same message where it calls them (model.py: ModelArgs.from_hf,
read_config, load_model; tokenizer.py: load_tokenizer, load_tokenizer_file), with `raised_as`.

What it holds: `FormatError`; `raised_as(error)`, the block whose FormatError is raised on as the
core's own error; `mismatch`, one FormatError for every tensor that does not fit a model.
"""
from __future__ import annotations

import contextlib


class FormatError(ValueError):
    """A file that cannot be read as what it claims to be; the message names the file and the
    fix."""


@contextlib.contextmanager
def raised_as(error: type[Exception]):
    """Run the block; a FormatError raised in it is raised on as `error` (model.py's
    CheckpointError, say) with the same message, and without the reader's traceback."""
    try:
        yield
    except FormatError as e:
        raise error(str(e)) from None


def mismatch(what: str, problems: list[str]) -> FormatError:
    """One error for tensors that do not fit the model: `what`, then every problem (the first 8)."""
    shown = "; ".join(problems[:8])
    if len(problems) > 8:
        shown += f"; and {len(problems) - 8} more"
    return FormatError(f"{what}: {shown}")
