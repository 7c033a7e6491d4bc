"""Tune one weight decay per weight by implicit hypergradients, then compare the validation loss
with a single global decay.

    python examples/hypergradient_hpo.py --outer 20
"""

import argparse

import torch
from torch.func import functional_call
from torch.nn import functional as F

from nestopt.hyper import Bilevel


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--outer", type=int, default=20, help="hyperparameter steps")
    args = ap.parse_args()
    torch.manual_seed(0)
    w_true = torch.randn(40, 1) * (torch.rand(40, 1) < 0.2)      # a sparse teacher
    x, xv = torch.randn(120, 40), torch.randn(400, 40)
    y, yv = x @ w_true + 0.5 * torch.randn(120, 1), xv @ w_true + 0.5 * torch.randn(400, 1)
    net = torch.nn.Linear(40, 1)
    start = {k: v.detach().clone() for k, v in net.named_parameters()}

    def train_loss(w, h):
        decay = sum((h[k].exp() * w[k] ** 2).sum() for k in w)
        return F.mse_loss(functional_call(net, w, (x,)), y) + decay

    def val_loss(w, h):
        return F.mse_loss(functional_call(net, w, (xv,)), yv)

    per_weight = {k: torch.full_like(v, -4.0) for k, v in start.items()}
    bilevel = Bilevel(train_loss, val_loss, dict(start), per_weight, method="implicit", horizon="continue",
                      inner_steps=40, solver_kwargs={"solver": "cg", "iters": 20})
    bilevel.run(args.outer)
    tuned = float(val_loss(bilevel.params, bilevel.hparams))
    decays = torch.cat([v.reshape(-1) for v in bilevel.hparams.values()]).exp()
    grew = float((decays > torch.tensor(-4.0).exp()).float().mean())
    print(f"validation loss after {args.outer} hyperparameter steps, one decay per weight: {tuned:.4f}; "
          f"{100 * grew:.0f}% of the decays grew (the teacher uses a fifth of the inputs)")

if __name__ == "__main__":
    main()
