"""Meta-training learned optimizers: update networks (:mod:`.nets`) and the outer trainer
(:mod:`.train`)."""

from ..nets import CoordinateLSTM, DirectUpdateMLP, GradientAttention, HybridAdamNet, LinearUpdate, UpdateNet
from .train import MetaConfig, PersistentES, Unrolls, meta_train

__all__ = ["CoordinateLSTM", "DirectUpdateMLP", "GradientAttention", "HybridAdamNet", "LinearUpdate", "MetaConfig", "PersistentES", "UpdateNet",
           "Unrolls", "meta_train"]
