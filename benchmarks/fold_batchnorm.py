"""A frozen teacher's forward with its BatchNorm folded into its convs, against the plain one.

`runtime.fold_frozen_batchnorm` (default on) folds a frozen, eval-mode backbone's BatchNorms into the convs
that feed them (ray_kd/models/folding.py): a KD step on CPUs waits on exactly this forward. This measures
the median seconds of one no-grad forward of each teacher, plain and folded, in both memory layouts, at one
thread (as each Ray worker runs) and two (as the one-process executor runs on this machine), the variants
alternating so a busy minute slows them all; and the largest difference between plain and folded logits
over the largest logit, to show it is float rounding.

    .venv/bin/python benchmarks/fold_batchnorm.py [--batch 128] [--repeats 15] [--models resnet20 resnet56]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path


def measure(name: str, batch: int, repeats: int, threads: int) -> dict:
    import torch

    from ray_kd.models import create_model
    from ray_kd.models.folding import fold_batchnorm

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    plain = create_model(name, 10).eval()
    folded = copy.deepcopy(plain)
    count = fold_batchnorm(folded)
    x = torch.randn(batch, 3, 32, 32)
    variants = {}
    for layout, fmt in (("nchw", torch.contiguous_format), ("nhwc", torch.channels_last)):
        for kind, net in (("plain", plain), ("folded", folded)):
            variants[f"{kind}_{layout}"] = (copy.deepcopy(net).to(memory_format=fmt), x.contiguous(memory_format=fmt))
    times = {k: [] for k in variants}
    with torch.no_grad():
        a, b = variants["plain_nchw"][0](x)[0], variants["folded_nchw"][0](x)[0]
        rounding = float((a - b).abs().max() / a.abs().max())
        for net, batch_x in variants.values():  # warm up (oneDNN picks its kernels on first use)
            net(batch_x)
        for _ in range(repeats):
            for key, (net, batch_x) in variants.items():
                start = time.perf_counter()
                net(batch_x)
                times[key].append(time.perf_counter() - start)
    med = {f"{k}_ms": round(1000 * statistics.median(v), 1) for k, v in times.items()}
    return {"model": name, "threads": threads, "folded_bns": count, **med,
            "speedup_nchw": round(med["plain_nchw_ms"] / med["folded_nchw_ms"], 2),
            "speedup_nhwc": round(med["plain_nhwc_ms"] / med["folded_nhwc_ms"], 2),
            "logit_rel_diff": float(f"{rounding:.1e}")}


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import machine, save

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--models", nargs="+", default=["resnet20", "resnet56", "resnet32x4", "vgg13", "wrn_40_2"],
                        help="teachers (default: the CIFAR teachers of the papers' pairs, and the 15-epoch one)")
    args = parser.parse_args()
    info = machine()
    rows = []
    for name in args.models:
        for threads in args.threads:
            rows.append(measure(name, args.batch, args.repeats, threads))
            print(rows[-1], flush=True)
    notes = (__doc__.split("\n\n")[1].strip() + f"\n\nBatch {args.batch} of 3x32x32 images, median of "
             f"{args.repeats} alternating repeats. speedup_*: plain ms / folded ms in that layout. "
             "WRN is pre-activation (BN -> ReLU -> conv): only the BatchNorms right after a conv fold.")
    save("fold_batchnorm", "A frozen teacher's forward, BatchNorm folded (runtime.fold_frozen_batchnorm) vs plain",
         rows, ["model", "threads", "folded_bns", "plain_nchw_ms", "folded_nchw_ms", "speedup_nchw",
                "plain_nhwc_ms", "folded_nhwc_ms", "speedup_nhwc", "logit_rel_diff"], info, notes)


if __name__ == "__main__":
    main()
