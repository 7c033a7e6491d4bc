"""A plain PyTorch loop with Polyak's step size, its telemetry in TensorBoard and a CSV file.

    python examples/plain_tensorboard.py --steps 200 --out runs/polyak
    tensorboard --logdir runs/polyak
"""

import argparse

import torch

from nestopt.integrations.telemetry import TelemetryWriter
from nestopt.optim import Polyak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--out", default="runs/polyak")
    args = ap.parse_args()
    torch.manual_seed(0)
    x = torch.randn(1024, 16)
    y = torch.tanh(x @ torch.randn(16, 1))
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 1))
    opt = Polyak(model.parameters(), scope="group")
    with TelemetryWriter(args.out, csv=f"{args.out}/telemetry.csv") as log:
        for step in range(args.steps):
            i = torch.randint(0, len(x), (64,))

            def closure():
                opt.zero_grad()
                loss = torch.nn.functional.mse_loss(model(x[i]), y[i])
                loss.backward()
                return loss

            loss = opt.step(closure)
            log.write(opt, step)
    print(f"final loss {float(loss):.4f}; eta {opt.telemetry()['eta']:.3g}; wrote {args.out}")


if __name__ == "__main__":
    main()
