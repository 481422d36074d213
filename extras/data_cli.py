"""
extras/data_cli.py: data.py's command line, its flags and the stages it runs.

Why it exists: `python data.py STAGE --help` should explain every flag, and that takes more lines
than the stages themselves. A learner reads data.py's stage functions (build_windows, compute_dists,
align_source), which are the whole method; a user runs them from the command line, whose flags,
defaults, help and error handling are here. `python data.py ...` runs `main` below.

What it holds: `parser(description)`, the argparse parser of the four stages (windows, dists, align,
all); `main(argv)`, which runs the chosen stages in order and turns a bad input into one
`error: ...` line; `source_name`, the name `all` gives a source folder (models/<name>,
aligned/<name>), which train.py --online uses too.
"""
from __future__ import annotations

import argparse

from pathlib import Path

import align
import common
import data
from extras import fast_head


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="stage", required=True)
    w = sub.add_parser("windows", help="corpus -> text windows every tokenizer fits in seq_len")
    d = sub.add_parser("dists", help="one model's top-K next-token distributions over every window")
    a = sub.add_parser("align", help="carry one source's distributions onto the target")
    al = sub.add_parser("all", help="windows, then dists for the target and each source, then "
                                    "align each source")
    for sp in (w, al):
        sp.add_argument("--corpus", required=True, help=".txt, .jsonl, or a folder of them")
        sp.add_argument("--target", required=True, help="the target model folder")
        sp.add_argument("--sources", nargs="+", default=[], help="source model folders")
        sp.add_argument("--seq-len", type=int, default=2048,
                        help="max tokens per window for every tokenizer")
        sp.add_argument("--shard-windows", type=int, default=256, help="windows per shard")
        sp.add_argument("--text-field", default="text", help="the text field of .jsonl lines")
        sp.add_argument("--txt-docs", choices=["file", "blocks"], default="file",
                        help="a .txt file is one document, or blank-line separated blocks are")
    for sp in (d, al):
        sp.add_argument("--topk", type=int, default=None,
                        help="next-token entries kept per token, 1..255 (default 10)")
        sp.add_argument("--sample", type=int, default=0, metavar="N",
                        help="instead of the top-K, store N ids drawn from each model's whole "
                             "next-token distribution, each weighing 1/N (unbiased: Random "
                             "Sampling KD, Anshumann et al. 2025; about 12 suffice; 1..255). Every "
                             "model of a data folder is stored the same way; align with nanofuse "
                             "or paper (not official)")
        sp.add_argument("--batch-size", type=int, default=8,
                        help="windows per forward pass (default 8)")
        sp.add_argument("--device", default="auto", help=common.DEVICE_HELP)
        sp.add_argument("--logprob-bits", type=int, default=8, choices=[8, 16],
                        help="stored log-probs: uint8 in steps of 1/16 nat (default) or fp16")
    d.add_argument("--model", required=True, help="the model folder to run")
    d.add_argument("--name", required=True,
                   help="'target' for the target model, any name for a source")
    a.add_argument("--name", required=True, help="the source's name given to `dists`")
    for sp in (a, al):
        sp.add_argument("--align", choices=list(align.PRESETS), default="nanofuse",
                        help="the alignment preset (align.PRESETS): nanofuse (default: tokens that "
                             "end at the same byte, the next-token vocab map), paper (the paper's "
                             "MinED alignment and vocab map), or official (the official code's "
                             "choices, its mistakes included)")
        sp.add_argument("--vocab-map", choices=list(align.VOCAB_MAPS), default=None,
                        help="replace the preset's vocab map: next, mined, or em (the paper's EM "
                             "ablation: --align paper --vocab-map em)")
    for sp in (w, d, a, al):
        sp.add_argument("--data", required=True,
                        help="the data folder (written by windows, read by every stage)")
        sp.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def main(argv=None):
    """The stages in order (`python data.py STAGE --help`: the flags, above)."""
    args = parser(data.__doc__).parse_args(argv)
    if getattr(args, "sample", 0) and args.topk is not None:
        raise SystemExit(f"error: --topk {args.topk} and --sample {args.sample} both given: "
                         f"--sample N stores N sampled ids instead of the top-K; choose one")
    topk = args.topk if getattr(args, "topk", None) is not None else 10
    if args.stage in ("dists", "all") and not 1 <= (args.sample or topk) <= 255:   # before any work
        flag = f"--sample {args.sample}" if args.sample else f"--topk {topk}"
        raise SystemExit(f"error: {flag}: choose 1 to 255 (aligned distributions store their sizes "
                         f"as uint8)")
    if args.stage in ("dists", "all"):       # NANOFUSE_HEAD (the GPU head's switch): a typo now
        try:
            fast_head.head_mode(common.device(args.device).startswith("cuda"))
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
    if args.stage == "all" and args.sample and align.PRESETS[args.align]["merge"] == "first":
        raise SystemExit(f"error: --align {args.align} merges repeated ids with 'first', which "
                         f"would keep one of --sample's repeated draws; use nanofuse or paper")
    try:
        if args.stage in ("windows", "all"):
            data.build_windows(args.corpus, args.target, args.sources, args.data, args.seq_len,
                               args.shard_windows, args.text_field, args.txt_docs, args.quiet)
        if args.stage == "dists":
            data.compute_dists(args.data, args.model, args.name, topk, args.batch_size,
                               args.device, args.logprob_bits, args.quiet, args.sample)
        if args.stage == "align":
            data.align_source(args.data, args.name, args.align, args.vocab_map, quiet=args.quiet)
        if args.stage == "all":
            names = ["target"] + [source_name(s) for s in args.sources]
            for model, name in zip([args.target, *args.sources], names):
                data.compute_dists(args.data, model, name, topk, args.batch_size,
                                   args.device, args.logprob_bits, args.quiet, args.sample)
            for name in names[1:]:
                data.align_source(args.data, name, args.align, args.vocab_map, quiet=args.quiet)
    except ValueError as e:            # DataError, CheckpointError, TokenizerError: one clear line
        raise SystemExit(f"error: {e}") from None


def source_name(path) -> str:
    """The name `data.py all` gives a source folder: its folder name, spaces as underscores."""
    return Path(path).name.replace(" ", "_") or "source"
