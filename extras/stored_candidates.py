"""extras/stored_candidates.py: the candidates' distributions read back from data.py's shards.

Why it exists: a learner follows one training step from a batch of windows, each with the target's
tokens and every candidate's top-K on them (train.Batches hands out which windows); the reading
itself is data.FusionData's. What is left between the two is bookkeeping a real run needs: the
sources --use-sources chooses, a shard cache sized to one shuffle block (--shuffle-shards), and the
candidates' names in the order fusellm.collate takes them. --online swaps in extras/online.py's
OnlineCandidates, which computes the same items inside the loop.

What it holds: StoredCandidates (names, k, items(picked)).
"""
from __future__ import annotations

import data


class StoredCandidates:
    """Candidates from data.py's fusion-ready data (--online: extras/online.py computes them
    instead). names: "target" then the sources; k: the top-K the data was made with;
    items(picked): the windows [(shard, window), ...] with every candidate's rows."""

    def __init__(self, cfg, tok):
        chosen = list(cfg.use_sources) or None
        shards = data.load_manifest(cfg.data)["shards"]
        self.fd = data.FusionData(cfg.data, tokenizer=tok, sources=chosen,
                                  cache_shards=min(cfg.shuffle_shards or shards, shards))
        self.names = ["target"] + self.fd.sources
        self.k = data.model_info(cfg.data, "target")["topk"]

    def items(self, picked):
        return [self.fd.shard(s)[w] for s, w in picked]
