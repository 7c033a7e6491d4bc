"""Networks that optimizers run: update networks for learned optimizers (:mod:`.update`), the
nested optimizer's controller (:mod:`.controller`), and their file format (:mod:`.weights`).

This layer sits below both :mod:`nestopt.optim` (which runs the networks) and
:mod:`nestopt.meta` (which trains them); it imports neither."""

from .controller import Controller
from .update import KINDS, CoordinateLSTM, DirectUpdateMLP, GradientAttention, HybridAdamNet, LinearUpdate, UpdateNet
from .weights import FORMAT, SHIPPED, SHIPPED_NETS, build, load_net, net_metadata, save_net

__all__ = ["FORMAT", "KINDS", "SHIPPED", "SHIPPED_NETS", "Controller", "CoordinateLSTM", "DirectUpdateMLP",
           "GradientAttention", "HybridAdamNet", "LinearUpdate", "UpdateNet", "build", "load_net", "net_metadata",
           "save_net"]
