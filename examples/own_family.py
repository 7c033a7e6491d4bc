"""Meta-train a learned optimizer on your own task family, then train a new task with it.

    python examples/own_family.py --steps 20 --out runs/own-family

The family is a class with ``sample(seed) -> Task``; ``nestopt meta-train --family module:Class``
imports it (here this file, from its folder).
"""

import argparse
import os
import subprocess
import sys

import numpy as np

from nestopt.tasks import RotatedQuadratic, TaskFamily


class WideQuadratics(TaskFamily):
    """Rotated quadratics of dimension 16 to 64 and condition number 10 to 1000."""

    name = "wide-quadratics"
    description = "rotated quadratics, dim 16-64, condition 10-1e3"

    def sample(self, seed: int):
        rng = np.random.default_rng(seed)
        dim, cond = int(rng.integers(16, 65)), float(10 ** rng.uniform(1.0, 3.0))
        return RotatedQuadratic(cond=cond, dim=dim, structure_seed=seed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20, help="outer (meta-training) steps")
    ap.add_argument("--out", default="runs/own-family")
    args = ap.parse_args()
    here = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([here, os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-m", "nestopt", "meta-train", "--family", "own_family:WideQuadratics",
                    "--net", "linear", "--method", "pes", "--pairs", "2", "--unroll", "4", "--horizon", "16",
                    "--steps", str(args.steps), "--seed", "0", "--out", args.out, "--force"], check=True, env=env)
    from nestopt.optim import LearnedOptimizer

    task = WideQuadratics().sample(1234)                       # a task it never saw
    model = task.point(task.start)
    opt = LearnedOptimizer(model.parameters(), net=os.path.join(args.out, "net.safetensors"))
    start = float(task.f(model.x.detach()))
    for _ in range(200):
        opt.zero_grad()
        task.f(model.x).backward()
        opt.step()
    print(f"on a held-out task the meta-trained optimizer took the loss from {start:.4g} to "
          f"{float(task.f(model.x.detach())):.4g} in 200 steps")

if __name__ == "__main__":
    main()
