"""
bench.py: benchmarks, each reporting ratios measured in one run.

    python bench.py load [--dim 1024 --layers 8 --vocab 32000]

load: build a random Llama checkpoint of about the given size, then in fresh processes time
`fusellm.load_model` (and `transformers` when installed) and record peak resident memory (VmHWM) after
loading and after one forward pass, against the checkpoint's size on disk.
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import fusellm

CHILD = r"""
import json, sys, time, torch
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) * 1024
which, path = sys.argv[1], sys.argv[2]
import fusellm
if which == "transformers":
    import transformers
base = hwm()
t0 = time.perf_counter()
if which == "nanofuse":
    model = fusellm.load_model(path)
else:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
load_s = time.perf_counter() - t0
after_load = hwm()
with torch.no_grad():
    t0 = time.perf_counter()
    model(torch.zeros(1, 16, dtype=torch.long))
    fwd_s = time.perf_counter() - t0
print(json.dumps(dict(load_s=load_s, fwd_s=fwd_s, base=base, after_load=after_load, after_forward=hwm())))
"""


def run_child(which, path):
    out = subprocess.run([sys.executable, "-c", CHILD, which, str(path)], capture_output=True, text=True,
                         cwd=Path(__file__).parent)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_load(a):
    args = fusellm.ModelArgs(vocab_size=a.vocab, dim=a.dim, n_layers=a.layers, n_heads=a.dim // 64,
                             n_kv_heads=a.dim // 64, head_dim=64, hidden_dim=int(a.dim * 8 / 3) // 64 * 64,
                             sliding_layers=(False,) * a.layers)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "ckpt"
        with torch.device("meta"):
            model = fusellm.Transformer(args)
        model = model.to_empty(device="cpu")
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.02)
        fusellm.save_model(model, path)
        del model
        size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        print(f"checkpoint: Llama dim={a.dim} layers={a.layers} vocab={a.vocab}, {size / 2**20:.0f} MiB fp32")
        runners = ["nanofuse"]
        try:
            import transformers  # noqa: F401
            runners.append("transformers")
        except ImportError:
            print("(transformers not installed: nanofuse only)")
        print(f"{'loader':<13}{'load s':>8}{'forward s':>11}{'peak RSS after load':>22}{'after forward':>16}")
        for which in runners:
            r = run_child(which, path)
            load_mem = (r["after_load"] - r["base"]) / size
            fwd_mem = (r["after_forward"] - r["base"]) / size
            print(f"{which:<13}{r['load_s']:>8.3f}{r['fwd_s']:>11.3f}{load_mem:>19.2f} x ckpt{fwd_mem:>11.2f} x ckpt")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    load = sub.add_parser("load", help="time and peak memory of load_model against the checkpoint size")
    load.add_argument("--dim", type=int, default=1024)
    load.add_argument("--layers", type=int, default=8)
    load.add_argument("--vocab", type=int, default=32000)
    a = p.parse_args()
    {"load": bench_load}[a.cmd](a)


if __name__ == "__main__":
    main()
