"""NHWC vs NCHW: one training step and one scoring pass of every built-in model, in both memory layouts.

`runtime.channels_last` (default on) lays out a role's conv weights and every image batch in NHWC, the
layout oneDNN's CPU convolutions and GPU tensor cores run fastest in. This measures what that buys per model:
the median seconds of a training step (forward, backward, SGD step) and of a no-grad forward, one thread (as
`runtime.threads_per_worker`), the two layouts alternating so a busy minute slows both; and, before any
step, the largest difference between the two layouts' logits over the largest logit (a freshly initialised
deep net's logits are large), to show it is float rounding.

    .venv/bin/python benchmarks/channels_last.py [--batch 64] [--repeats 7] [--models resnet8 resnet20]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def measure(name: str, batch: int, repeats: int) -> dict:
    import torch

    from ray_kd.models import create_model

    channels, side = (1, 8) if name.startswith("digits") else (3, 32)  # the data each model is built for
    torch.manual_seed(0)
    plain = create_model(name, 10, channels)
    x = torch.randn(batch, channels, side, side)
    layouts = {"nchw": (plain, x),
               "nhwc": (copy.deepcopy(plain).to(memory_format=torch.channels_last),
                        x.contiguous(memory_format=torch.channels_last))}
    with torch.no_grad():  # the same weights in both layouts: the logits differ by float rounding only
        a, b = (net.eval()(batch_x)[0] for net, batch_x in layouts.values())
    rounding = float((a - b).abs().max() / a.abs().max())
    steps, scores = {k: [] for k in layouts}, {k: [] for k in layouts}
    for layout, (net, batch_x) in layouts.items():  # warm up both (oneDNN picks its kernels on first use)
        net.train()(batch_x)[0].sum().backward()
    for _ in range(repeats):
        for layout, (net, batch_x) in layouts.items():
            opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)

            def step():
                opt.zero_grad()
                net.train()(batch_x)[0].logsumexp(1).mean().backward()
                opt.step()

            def score():
                with torch.no_grad():
                    net.eval()(batch_x)

            steps[layout] += timed(step, 1)
            scores[layout] += timed(score, 1)
    med = {f"{kind}_{layout}_ms": round(1000 * statistics.median(times[layout]), 1)
           for kind, times in (("step", steps), ("score", scores)) for layout in layouts}
    return {"model": name, **med,
            "step_speedup": round(med["step_nchw_ms"] / med["step_nhwc_ms"], 2),
            "score_speedup": round(med["score_nchw_ms"] / med["score_nhwc_ms"], 2),
            "logit_rel_diff": float(f"{rounding:.1e}")}


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import torch

    from common import machine, save
    from ray_kd.models import list_models

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--models", nargs="+", default=None, help="default: every built-in model")
    args = parser.parse_args()
    info = machine()
    torch.set_num_threads(1)
    rows = []
    for name in args.models or list_models():
        rows.append(measure(name, args.batch, args.repeats))
        print(rows[-1], flush=True)
    speedups = sorted(r["step_speedup"] for r in rows)
    notes = (__doc__.split("\n\n")[1].strip() + f"\n\nBatch {args.batch} (digits models: 1x8x8 images, the others "
             f"3x32x32), median of {args.repeats} alternating repeats. Training-step speed-up NCHW/NHWC: median "
             f"{statistics.median(speedups):.2f}x, range {speedups[0]:.2f}-{speedups[-1]:.2f}x over "
             f"{len(rows)} models.")
    save("channels_last", "NHWC (runtime.channels_last) vs NCHW: seconds per training step and scoring pass",
         rows, ["model", "step_nchw_ms", "step_nhwc_ms", "step_speedup", "score_nchw_ms", "score_nhwc_ms",
                "score_speedup", "logit_rel_diff"], info, notes)


if __name__ == "__main__":
    main()
