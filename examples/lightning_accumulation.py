"""Lightning with gradient accumulation: the nested optimizer and Polyak read the whole batch's
loss (the micro-batches' mean), and their telemetry goes to TensorBoard.

    python examples/lightning_accumulation.py --steps 50 --out runs/lightning
"""

import argparse

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from nestopt.integrations.lightning import NestoptCallback
from nestopt.optim import NestedOptimizer, Polyak


class Classifier(L.LightningModule):
    def __init__(self, optimizer: str) -> None:
        super().__init__()
        self.optimizer = optimizer
        self.net = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 3))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        if self.optimizer == "polyak":
            return Polyak(self.parameters(), max_lr=10.0)
        return NestedOptimizer(self.parameters(), lr=3e-3, signal="proxy")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--optimizer", choices=("nested", "polyak"), default="nested")
    ap.add_argument("--out", default="runs/lightning")
    args = ap.parse_args()
    torch.manual_seed(0)
    x = torch.randn(2048, 20)
    y = (x[:, :3] + 0.3 * torch.randn(2048, 3)).argmax(1)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32, shuffle=True)
    trainer = L.Trainer(max_steps=args.steps, accumulate_grad_batches=4, callbacks=[NestoptCallback()],
                        logger=TensorBoardLogger(args.out, name=args.optimizer), log_every_n_steps=5,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu")
    module = Classifier(args.optimizer)
    trainer.fit(module, data)
    print({k: round(v, 4) for k, v in trainer.optimizers[0].telemetry().items()})


if __name__ == "__main__":
    main()
