"""Images/s of the study's training step (vgg_small, 28x28x1 Fashion-MNIST shape, batch 128, one thread: a
trial's share of this machine) in the four layouts/precisions the trainer offers, alternated round by round so
every arm sees the same load. Prints medians and the spread (IQR) of each, and each arm's ratio to the first arm listed (fp32 by default).

    python results/regime2/speed.py [--widths 8 16 32] [--rounds 7]
"""
import argparse
import statistics
import time

import torch

from nr_study.models import create_model
from nr_study.train import train_step

ARMS = {"fp32": (False, False), "channels_last": (True, False), "bf16": (False, True),
        "channels_last+bf16": (True, True)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--widths", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=5, help="steps timed per arm per round")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    args = ap.parse_args()
    torch.set_num_threads(1)
    for width in args.widths:
        steps = {}
        for arm in args.arms:
            cl, amp = ARMS[arm]
            torch.manual_seed(0)
            m = create_model("vgg_small", num_classes=10, in_channels=1, width=width)
            x = torch.randn(args.batch, 1, 28, 28)
            if cl:
                m, x = m.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
            y = torch.randint(0, 10, (args.batch,))
            opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
            step = lambda m=m, opt=opt, x=x, y=y, amp=amp: train_step(m, opt, x, y, amp=amp)  # noqa: E731
            step(), step()  # warm-up
            steps[arm] = step
        times = {arm: [] for arm in args.arms}
        for _ in range(args.rounds):
            for arm, step in steps.items():
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    step()
                times[arm].append((time.perf_counter() - t0) / args.steps)
        base = statistics.median(times[args.arms[0]])
        for arm, ts in times.items():
            q = statistics.quantiles([args.batch / t for t in ts], n=4)
            med = statistics.median(ts)
            print(f"width {width:3d} {arm:20s} {args.batch / med:7.0f} img/s (IQR {q[0]:.0f}-{q[2]:.0f}, "
                  f"n={len(ts)})  step {med / base:.2f}x {args.arms[0]}", flush=True)


if __name__ == "__main__":
    main()
