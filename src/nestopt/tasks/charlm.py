"""``charlm-transformer``: a tiny character-level transformer language model.

The corpus is the dataset descriptions (``DESCR`` reStructuredText files) that ship inside
scikit-learn: about 40 KB of English prose available offline on every install. The first 90% of
the characters train, the last 10% validate. The model is one pre-norm transformer block
(width 48, 4 heads, causal mask) over a 32-character context with learned positions.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import torch
from torch import nn

from .._checks import check_seed
from .base import Sampler, Task, generator

CONTEXT = 32


@functools.lru_cache(maxsize=None)
def corpus() -> str:
    """The concatenated scikit-learn dataset descriptions, in file-name order."""
    import sklearn.datasets

    folder = Path(sklearn.datasets.__file__).parent / "descr"
    files = sorted(folder.glob("*.rst"))
    if not files:
        raise RuntimeError(f"no corpus found: {folder} holds no .rst files")
    return "\n".join(f.read_text(encoding="utf-8") for f in files)


@functools.lru_cache(maxsize=None)
def encoded() -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    text = corpus()
    vocab = sorted(set(text))
    index = {c: i for i, c in enumerate(vocab)}
    ids = torch.tensor([index[c] for c in text], dtype=torch.long)
    cut = int(0.9 * len(ids))
    return ids[:cut], ids[cut:], vocab


class TinyTransformer(nn.Module):
    def __init__(self, vocab: int, width: int = 48, heads: int = 4, context: int = CONTEXT) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(0.02 * torch.randn(context, width))
        self.block = nn.TransformerEncoderLayer(width, heads, dim_feedforward=4 * width, dropout=0.0,
                                                batch_first=True, norm_first=True)
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        h = self.embed(ids) + self.pos[:t]
        h = self.block(h, src_mask=self.mask[:t, :t], is_causal=True)
        return self.out(self.norm(h))


class CharLMTask(Task):
    name = "charlm-transformer"
    kind = "language"
    default_steps = 300
    batch_size = 32
    has_accuracy = True
    description = "1-block char transformer (width 48) on scikit-learn's dataset descriptions"
    n_val_windows = 128

    def __init__(self) -> None:
        train, val, vocab = encoded()
        self.vocab_size = len(vocab)
        self.corpus_sha256 = hashlib.sha256(corpus().encode()).hexdigest()[:16]
        starts = torch.linspace(0, len(val) - CONTEXT - 2, self.n_val_windows).long()
        self._val = torch.stack([val[s:s + CONTEXT + 1] for s in starts.tolist()])
        self._train = train

    def init(self, seed: int) -> nn.Module:
        seed = check_seed("seed", seed, lo=None)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return TinyTransformer(self.vocab_size)

    def sampler(self, seed: int) -> Sampler:
        g = generator(seed, stream=4)
        n = len(self._train) - CONTEXT - 1
        offs = torch.arange(CONTEXT + 1)

        def next_batch(step: int) -> torch.Tensor:
            starts = torch.randint(n, (self.batch_size, 1), generator=g)
            return self._train[starts + offs]

        return next_batch

    def loss(self, model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        logits = model(batch[:, :-1])
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        was = model.training
        model.eval()
        logits = model(self._val[:, :-1])
        model.train(was)
        target = self._val[:, 1:]
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
        acc = (logits.argmax(-1) == target).float().mean()
        return {"val_loss": float(loss), "val_accuracy": float(acc)}
