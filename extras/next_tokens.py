"""
extras/next_tokens.py: `python fusellm.py FOLDER TEXT`, a model's most likely next tokens.

Why it exists: a user who has just downloaded or converted a checkpoint wants to see at once that it
loads and predicts sensibly, before spending hours on data.py and train.py. A learner does not need
it to follow the method; fusellm.py runs it when started as a script.

What it holds: `main`, the command line: load the model folder (fusellm.load), run it on the text
(BOS first when the tokenizer has one), and print the top k next tokens with their probabilities.
"""
from __future__ import annotations

import argparse
import math

import torch

import common
from model import load


@torch.no_grad()
def main(argv=None):
    p = argparse.ArgumentParser(description="Load a Hugging Face model folder and show its "
                                            "next-token top-k.")
    p.add_argument("path", help="a model folder (config.json, safetensors, tokenizer files)")
    p.add_argument("text", help="the text whose next token to show")
    p.add_argument("--k", type=int, default=10, help="how many tokens (default 10)")
    p.add_argument("--device", default="auto", help=common.DEVICE_HELP)
    a = p.parse_args(argv)
    a.device = common.device(a.device)
    try:
        model, tok = load(a.path, a.device, common.dtype_for(a.device))
    except ValueError as e:                    # CheckpointError, TokenizerError: one clear line
        raise SystemExit(f"error: {e}") from None
    ids = ([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(a.text)
    logits = model(torch.tensor([ids], device=a.device))[0, -1, :tok.vocab_size]
    top = logits.log_softmax(-1).topk(a.k)
    for lp, i in zip(top.values.tolist(), top.indices.tolist()):
        print(f"{math.exp(lp):8.4f}  {i:7d}  {tok.token_str(i)!r}")
