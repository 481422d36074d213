"""
estimate.py: what a fusion run will cost before you pay for it: disk, memory per process, time.

    python tools/estimate.py --paper --fsdp --grad-checkpointing --micro-batch 2   # the paper's run: Llama-2 7B target,
                                    # OpenLLaMA 7B and MPT 7B sources, MiniPile (1.8B tokens), 8 x A100-40GB
    python tools/estimate.py --target T --sources A B --tokens 1.8e9 --gpus 8 --gpu h100

Models are read from their config.json (or .gguf header) and built on the meta device to count their
parameters: nothing is loaded, nothing is allocated. Then, for data.py and train.py as they run:

- disk: the windows' text, each model's top-K (data.py dists), each source aligned onto the target (align),
  before compression (the .npz files are deflated; measured: about 0.6 of this on a random model);
- memory per GPU: data.py dists (one model per GPU, bf16: its weights, one batch's working set, one block
  of the output head) and train.py (fp32 master weights, gradients and Adam state, whole per GPU under DDP
  and split under FSDP; the activations of one micro-batch; the logits and their log-softmax);
- time: FLOPs (2 x parameters per token for a forward pass, 6 x for a training step, 8 x with gradient
  checkpointing, which runs the forward twice) at an assumed share
  of the GPU's peak (--mfu), and alignment at the CPU speed bench.py align measured.

The training memory is the sum of what train.py allocates, counted per token from the code: the test checks
it against the bytes PyTorch really keeps (tensors saved for backward, parameters, gradients, Adam state) on
small models on the CPU. Activations are counted in fp32; under bf16 autocast on a GPU about half of them
are bf16, so the figure is an upper bound there.
"""
from __future__ import annotations

import argparse
import sys
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the repository's top-level files
from extras.checkpoint_files import no_init
from extras.gguf import gguf_config, read_gguf
from model import ModelArgs, Transformer, read_config

# name -> (peak dense bf16 TFLOPS, memory GiB): the GPUs people train on
GPUS = {"a100-40": (312, 40), "a100-80": (312, 80), "h100": (989, 80), "h200": (989, 141)}
ALIGN_TOKENS_PER_S = 15_000      # MinED DTW, target tokens/s per process (bench.py align, 2-core CPU)
GIB = 2**30


def paper_models() -> dict[str, ModelArgs]:
    """The paper's three 7B models, by their published configs (no download needed to estimate)."""
    llama = dict(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, head_dim=128,
                 hidden_dim=11008, sliding_layers=(False,) * 32)
    return {"Llama-2-7b (target)": ModelArgs(**llama), "open_llama_7b": ModelArgs(**llama),
            "mpt-7b": ModelArgs(model_type="mpt", vocab_size=50432, dim=4096, n_layers=32, n_heads=32,
                                n_kv_heads=32, head_dim=128, hidden_dim=16384, norm="layer", mlp="gelu",
                                tie_embeddings=True, pos="alibi", sliding_layers=(False,) * 32)}


def model_args(path) -> ModelArgs:
    """A model's shape from its config.json, or from a .gguf file's header."""
    path = Path(path)
    if path.suffix == ".gguf":
        fields, infos, _ = read_gguf(path)
        return ModelArgs.from_hf(gguf_config(fields, path, [t["name"] for t in infos]), source=str(path))
    return read_config(path)


def n_params(args: ModelArgs) -> int:
    """Parameters, counted on a model built on the meta device (tied embeddings once)."""
    with torch.device("meta"), no_init():
        m = Transformer(args)
    return sum(p.numel() for p in m.parameters())


# ----------------------------------------------------------------------------------------------------
# The memory model


def norm_saved(a: ModelArgs, width: int) -> int:
    """Elements a norm keeps per token for backward: RMSNorm its input, 1/rms and the normalised input before
    the weight, plus its output for the matrix product that reads it (3 w + 1); LayerNorm its input, mean and
    1/std, plus its output (2 w + 2)."""
    return 3 * width + 1 if a.norm != "layer" else 2 * width + 2


def activation_elements_per_token(a: ModelArgs) -> dict[str, int]:
    """Elements train.py keeps for the backward pass, per token, read off model.py (and checked against what
    PyTorch keeps, in the tests): "layer", one block's: its norms; q, k and v as attention gets them, its
    output and log-sum-exp (SDPA's memory-efficient kernels keep those, no T x T scores); the MLP's two
    projections, the activation and the product (4 x hidden for a GLU), or the projection and the activation
    (2 x hidden); q/k norms and Gemma's extra norms where the model has them. "once": the token id, RoPE's
    cos and sin (or one row of ALiBi's mask per head), and the final norm."""
    C, q, kv, H = a.dim, a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim, a.n_heads
    norms = {"pre": 2, "post": 2, "sandwich": 4}[a.block_norms] * norm_saved(a, C)
    attention = q + 2 * kv + q + H
    if a.qk_norm:
        attention += norm_saved(a, q) - q + norm_saved(a, kv) - kv       # the norm's output replaces q and k
    mlp = 4 * a.hidden_dim if a.mlp != "gelu" else 2 * a.hidden_dim
    final = norm_saved(a, C) - C                                          # its output is returned, not kept
    return {"layer": norms + attention + mlp, "once": 2 + final}


def position_elements(a: ModelArgs, seq: int) -> int:
    """RoPE's cos and sin, (T, hd) each (twice with Gemma 3's local base), or ALiBi's (H, T, T) mask: one for
    all the windows of a micro-batch."""
    return 2 * a.head_dim * seq * (2 if a.rope_local else 1) if a.pos == "rope" else a.n_heads * seq * seq


def training_memory(a: ModelArgs, params: int, micro_windows: int, seq: int, world: int, fsdp: bool,
                    checkpointing: bool, K: int = 10, elem: int = 4) -> dict[str, float]:
    """Bytes per GPU of a train.py step: fp32 master weights (4), gradients (4) and Adam's two moments (8) per
    parameter, split over the processes under FSDP, which also gathers whole layers (the one it computes and
    the next, and the embeddings and head), while DDP keeps a second copy of the gradients; the activations the forward pass keeps for one
    micro-batch (every layer's; with gradient checkpointing only each layer's input) and, with checkpointing,
    one layer's recomputed in the backward pass; the logits, their log-softmax and the gradient, (b, T, V)
    each; and the fusion labels, K ids and probabilities per token. ALiBi's mask is (H, T, T), shared by the
    windows of a micro-batch."""
    tokens = micro_windows * seq
    act = activation_elements_per_token(a)
    once = act["once"] * tokens + position_elements(a, seq)
    kept = (a.n_layers * a.dim * tokens if checkpointing else a.n_layers * act["layer"] * tokens) + once
    out = {"weights, gradients, Adam": params * 16 / (world if fsdp else 1)}
    if world > 1 and fsdp:        # FSDP2 gathers the fp32 weights of the layer it computes and the next one
        layer = n_params(dataclasses.replace(a, n_layers=1)) - n_params(dataclasses.replace(a, n_layers=0))
        out["layers gathered (FSDP)"] = (2 * layer + params - a.n_layers * layer) * 4
    elif world > 1:               # DDP: the gradients again, in its all-reduce buckets
        out["gradient buckets (DDP)"] = params * 4
    out["activations kept"] = kept * elem
    if checkpointing:
        out["one layer recomputed"] = act["layer"] * tokens * elem
    out["logits and labels"] = 3 * tokens * a.vocab_size * elem + tokens * K * 16
    return out


def dists_memory(a: ModelArgs, params: int, windows: int, seq: int, elem: int = 2, head_elements: int = 2**26,
                 head_cols: int = 0, K: int = 10) -> dict[str, float]:
    """Bytes per GPU of data.py dists (bf16: elem 2), the peak of its two phases (checked against the tensors
    alive, in the tests). The layers: at a block's MLP the block's input, its residual sum and the normed
    input (3 C per token) are alive with the MLP's activation, up projection and product (3 x hidden for a
    GLU; 2 x hidden for a plain MLP). The output head (extras/fast_head.py): the final hidden states (C per
    token), one block of logits, rows x cols (the whole vocabulary per block on GPU), in the model's dtype
    and again in fp32 (fast_head's "eager" and "fp32" modes; its compiled default converts no block, so
    this is an upper bound there), and the running and the block's top-K rows with their merge (4 x K
    values and ids)."""
    tokens = windows * seq
    mlp = 3 * a.hidden_dim if a.mlp != "gelu" else 2 * a.hidden_dim
    body = (tokens * (3 * a.dim + mlp) + position_elements(a, seq)) * elem
    cols = min(a.vocab_size, head_cols or a.vocab_size)
    block = min(tokens, max(1, head_elements // cols)) * cols
    head = tokens * a.dim * elem + block * (4 + (elem if elem != 4 else 0)) + tokens * K * 4 * (4 + 8)
    return {"weights": params * elem, "layers" if body >= head else "output head": max(body, head)}


# ----------------------------------------------------------------------------------------------------
# The report


def fmt_bytes(b: float) -> str:
    return f"{b / GIB:,.1f} GiB" if b < 1024 * GIB else f"{b / 1024**4:,.2f} TiB"


def fmt_time(s: float) -> str:
    return f"{s / 3600:,.1f} h" if s >= 3600 else f"{s / 60:,.0f} min"


@dataclass
class Plan:
    models: dict[str, ModelArgs]         # the target first, then the sources
    tokens: float                        # corpus size in target tokens
    gpus: int
    gpu: str
    seq: int = 2048
    K: int = 10
    batch: int = 128                     # global batch, windows per optimizer step
    micro: int = 0                       # windows per forward pass per GPU (0: train.py's automatic choice)
    dists_batch: int = 8                 # windows per forward pass in data.py dists
    fsdp: bool = False                   # train.py --fsdp
    checkpointing: bool = False          # train.py --grad-checkpointing
    mfu: float = 0.4
    bytes_per_token: float = 4.0         # text bytes per target token (English prose with a 32k vocabulary)
    cpus: int = 8                        # processes for data.py align


def report(p: Plan) -> str:
    tflops, gib = GPUS[p.gpu]
    names = list(p.models)
    counts = {n: n_params(a) for n, a in p.models.items()}
    target = p.models[names[0]]
    lines = [f"{len(names) - 1} source(s) into {names[0]}: " + ", ".join(f"{n} {counts[n] / 1e9:.2f}B"
                                                                          for n in names),
             f"{p.tokens:,.0f} target tokens in windows of {p.seq}; {p.gpus} x {p.gpu} ({tflops} TFLOPS bf16, "
             f"{gib} GiB); MFU assumed {p.mfu:.0%}", ""]

    disk = {"windows (text)": p.tokens * p.bytes_per_token}
    for n, a in p.models.items():
        id_bytes = 2 if a.vocab_size <= 65536 else 4
        disk[f"dists {n}"] = p.tokens * p.K * (id_bytes + 1)
    for n in names[1:]:
        disk[f"aligned {n}"] = p.tokens * (1 + p.K * (2 if target.vocab_size <= 65536 else 4) + p.K)
    lines.append("disk (before compression; about 0.6 of it after):")
    lines += [f"  {k:<40}{fmt_bytes(v):>14}" for k, v in disk.items()]
    lines += [f"  {'total':<40}{fmt_bytes(sum(disk.values())):>14}", ""]

    lines.append(f"data.py dists, per GPU (one model per GPU, bf16, {p.dists_batch} windows per pass; the peak of "
                 f"the layers' and the output head's working sets):")
    for n, a in p.models.items():
        m = dists_memory(a, counts[n], p.dists_batch, p.seq)
        lines.append(f"  {n:<40}{fmt_bytes(sum(m.values())):>14}   ("
                     + ", ".join(f"{k} {fmt_bytes(v)}" for k, v in m.items()) + ")")
    lines.append("  host memory per rank: the checkpoint's pages (memory-mapped, shared by the node's ranks) "
                 "and about one tensor")
    lines.append("")

    import train
    micro, accum = train.batch_plan(p.batch, p.micro, p.gpus)          # exactly as train.py splits the batch
    mem = training_memory(target, counts[names[0]], micro, p.seq, p.gpus, p.fsdp and p.gpus > 1, p.checkpointing, p.K)
    total = sum(mem.values())
    flags = f"--batch-size {p.batch} --micro-batch {micro}" + " --fsdp" * p.fsdp + " --grad-checkpointing" * p.checkpointing
    lines.append(f"train.py, per GPU (torchrun --nproc_per_node {p.gpus} train.py {flags}: "
                 f"{'FSDP2' if p.fsdp and p.gpus > 1 else 'DDP' if p.gpus > 1 else 'one process'}; global batch "
                 f"{p.batch} = {p.gpus} GPUs x {micro} x {accum} accumulation steps):")
    lines += [f"  {k:<40}{fmt_bytes(v):>14}" for k, v in mem.items()]
    fits = (f"fits in {gib} GiB (less 10% for the allocator)" if total <= 0.9 * gib * GIB else
            f"does NOT fit in {gib} GiB less 10% for the allocator: add GPUs, --fsdp, --grad-checkpointing, or lower "
            f"--micro-batch")
    lines += [f"  {'total':<40}{fmt_bytes(total):>14}   {fits}", ""]

    peak = p.gpus * tflops * 1e12 * p.mfu
    t_dists = {n: 2 * counts[n] * p.tokens / peak for n in names}
    t_align = (len(names) - 1) * p.tokens / (ALIGN_TOKENS_PER_S * p.cpus)
    t_train = (8 if p.checkpointing else 6) * counts[names[0]] * p.tokens / peak   # checkpointing: the forward twice
    lines.append("time:")
    lines += [f"  {'dists ' + n:<40}{fmt_time(t):>14}" for n, t in t_dists.items()]
    lines.append(f"  {f'align ({p.cpus} CPU processes)':<40}{fmt_time(t_align):>14}")
    lines.append(f"  {'train (1 epoch)':<40}{fmt_time(t_train):>14}")
    lines.append(f"  {'total':<40}{fmt_time(sum(t_dists.values()) + t_align + t_train):>14}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--paper", action="store_true", help="the paper's models, MiniPile's 1.8B tokens, 8 x A100-40GB")
    ap.add_argument("--target", help="the target model (folder with config.json, or .gguf)")
    ap.add_argument("--sources", nargs="+", default=[], help="source models")
    ap.add_argument("--tokens", type=float, default=1.8e9, help="corpus size in target tokens (default 1.8e9)")
    ap.add_argument("--gpus", type=int, default=8, help="GPUs (default 8)")
    ap.add_argument("--gpu", choices=list(GPUS), default=None, help="GPU kind (default a100-40 with --paper, else h100)")
    ap.add_argument("--seq-len", type=int, default=2048, help="tokens per window (default 2048)")
    ap.add_argument("--batch-size", type=int, default=128, help="global batch, windows per step (default 128)")
    ap.add_argument("--micro-batch", type=int, default=0,
                    help="windows per forward pass per GPU (default 0: train.py's choice, the largest divisor up to 8)")
    ap.add_argument("--fsdp", action="store_true", help="as train.py --fsdp (default: DDP, the whole model per GPU)")
    ap.add_argument("--grad-checkpointing", action="store_true", help="as train.py --grad-checkpointing")
    ap.add_argument("--mfu", type=float, default=0.4, help="share of the GPU's peak reached (default 0.4)")
    ap.add_argument("--cpus", type=int, default=8, help="processes for data.py align (default 8)")
    a = ap.parse_args(argv)
    if a.paper:
        models = paper_models()
    elif a.target:
        try:
            models = {f"{Path(a.target).name} (target)": model_args(a.target),
                      **{Path(s).name: model_args(s) for s in a.sources}}
        except (ValueError, OSError) as e:
            raise SystemExit(f"error: {e}") from None
    else:
        raise SystemExit("error: give --paper, or --target (and --sources) model folders")
    import train
    try:
        train.batch_plan(a.batch_size, a.micro_batch, a.gpus)
    except train.TrainingError as e:
        raise SystemExit(f"error: {e}") from None
    plan = Plan(models, a.tokens, a.gpus, a.gpu or ("a100-40" if a.paper else "h100"), a.seq_len,
                batch=a.batch_size, micro=a.micro_batch, fsdp=a.fsdp, checkpointing=a.grad_checkpointing,
                mfu=a.mfu, cpus=a.cpus)
    print(report(plan))


if __name__ == "__main__":
    main(sys.argv[1:])
