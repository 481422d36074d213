"""extras/: what a real user needs and a learner does not, one import away from the reading path.

The top-level files (fusellm.py, align.py, data.py, train.py, eval.py, model.py, tokenizer.py,
common.py) hold the method and the plain path through it. Everything here is reached from them by
a lazy import at the point where it is needed: a `.gguf` path pulls in the GGUF reader, `torchrun`
pulls in the distributed plumbing, an exotic family's config.json pulls in its translation. Each
file opens with why it exists; README.md's layout gives one line per file.
"""
