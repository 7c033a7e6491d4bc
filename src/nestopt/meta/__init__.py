"""Meta-training learned optimizers: update networks (:mod:`.nets`) and the outer trainer
(:mod:`.train`)."""

from .nets import DirectUpdateMLP, HybridAdamNet, UpdateNet
from .train import MetaConfig, meta_train

__all__ = ["DirectUpdateMLP", "HybridAdamNet", "MetaConfig", "UpdateNet", "meta_train"]
