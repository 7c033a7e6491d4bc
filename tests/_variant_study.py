"""A module that registers a study variant when imported, as a study does (for test_bench)."""

from functools import partial

import torch

from nestopt.bench import registry


def _sgd(params, lr, momentum):
    return torch.optim.SGD(params, lr=lr, momentum=momentum)


# a partial compares by identity: the copy a worker unpickles is not equal to the one it imports
SPEC = registry.register_variant(registry.OptimizerSpec(
    "test-variant:sgd-momentum-0.5", partial(_sgd, momentum=0.5), default_lr=0.1))
