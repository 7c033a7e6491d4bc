"""Hugging Face's Trainer with a nestopt optimizer: a tiny GPT-2 built from a config (nothing is
downloaded), trained with the default nested optimizer (hindsight signal), checkpointed and resumed.

    python examples/hf_trainer.py --steps 40 --out runs/hf
"""

import argparse
import os

import torch
import transformers

from nestopt.integrations.hf import NestoptTrainer
from nestopt.optim import NestedOptimizer


def run(out: str, steps: int, resume: str | None = None) -> torch.Tensor:
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config)
    g = torch.Generator().manual_seed(1)
    starts = torch.randint(0, 64, (256, 1), generator=g)
    ids = (starts + torch.arange(24)) % 64                   # counting sequences: learnable
    data = [{"input_ids": r, "labels": r} for r in ids]
    opt = NestedOptimizer(model.parameters(), lr=3e-3, window=4, period=8)
    args = transformers.TrainingArguments(out, max_steps=steps, per_device_train_batch_size=8,
                                          gradient_accumulation_steps=2, save_strategy="steps",
                                          save_steps=max(1, steps // 2), report_to=[], use_cpu=True, seed=0,
                                          logging_steps=max(1, steps // 4), lr_scheduler_type="constant",
                                          disable_tqdm=True)
    NestoptTrainer(model=model, args=args, train_dataset=data, optimizers=(opt, None)).train(resume_from_checkpoint=resume)
    print("telemetry:", {k: round(v, 4) for k, v in opt.telemetry().items()})
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--out", default="runs/hf")
    args = ap.parse_args()
    whole = run(os.path.join(args.out, "whole"), args.steps)
    resumed = run(os.path.join(args.out, "whole"), args.steps,
                  resume=os.path.join(args.out, "whole", f"checkpoint-{max(1, args.steps // 2)}"))
    print("resumed run ends where the whole one does:", torch.equal(whole, resumed))


if __name__ == "__main__":
    main()
