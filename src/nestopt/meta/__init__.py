"""Meta-training learned optimizers: update networks (:mod:`nestopt.nets`), the outer trainer
(:mod:`.train`) and its meta-gradient estimators (:mod:`.estimators`)."""

from ..nets import CoordinateLSTM, DirectUpdateMLP, GradientAttention, HybridAdamNet, LinearUpdate, UpdateNet
from .estimators import ES, ESTIMATORS, Estimate, GradientEstimator, PersistentES, Surrogate, TruncatedBackprop
from .train import METHODS, MetaConfig, Unrolls, meta_train

__all__ = ["CoordinateLSTM", "DirectUpdateMLP", "ES", "ESTIMATORS", "Estimate", "GradientAttention",
           "GradientEstimator", "HybridAdamNet", "LinearUpdate", "METHODS", "MetaConfig", "PersistentES", "Surrogate",
           "TruncatedBackprop", "UpdateNet", "Unrolls", "meta_train"]
