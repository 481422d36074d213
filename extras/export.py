"""extras/export.py: what a finished run leaves for its user: the model folder and the loss curve.

Why it exists: a learner follows the losses train.py prints; a user wants the trained target as a
model folder that other tools load (fusellm.load_model here, transformers elsewhere), in the dtype
and shard sizes the target came in, and a picture of the losses to glance at. train.py calls both at
the end of a run.

What it holds: export (the trained weights as a model folder with the target's tokenizer files) and
plot_losses (out/loss.png from out/metrics.jsonl, when matplotlib is installed).
"""
from __future__ import annotations

from pathlib import Path

import torch

import fusellm
from extras.checkpoint_files import checkpoint_layout


def export(args: fusellm.ModelArgs, state: dict, target: Path, out: Path):
    """The trained weights as a model folder (save_model) with the target's tokenizer files, in the
    target checkpoint's own dtype (bf16 in, bf16 out) and shards no larger than its largest."""
    dtype, shard_bytes = checkpoint_layout(target)
    with torch.device("meta"):
        final = fusellm.Transformer(args)
    weights = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype)
               for k, v in state.items()}
    final.load_state_dict(weights, assign=True, strict=False)
    if args.tie_embeddings:
        final.output.weight = final.tok_embeddings.weight
    names = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
             "special_tokens_map.json")
    extra = [target / n for n in names if (target / n).is_file()]
    return fusellm.save_model(final, out, max_shard_bytes=shard_bytes, extra_files=extra)
