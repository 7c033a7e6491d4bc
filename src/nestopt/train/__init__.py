"""The training loop shared by the bench, the studies and meta-training (:func:`train_loop`), and
its divergence rule (:class:`Divergence`)."""

from .loop import DEFAULT_CATCH, DIVERGE_FACTOR, Divergence, LoopResult, train_loop

__all__ = ["DEFAULT_CATCH", "DIVERGE_FACTOR", "Divergence", "LoopResult", "train_loop"]
