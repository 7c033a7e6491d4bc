"""nestopt: nested and learned optimization for PyTorch.

Subpackages:

- :mod:`nestopt.tasks`: the task suite (analytic, digits, regression, char LM, trading,
  two-player games) and task families for meta-training.
- :mod:`nestopt.optim`: optimizers and the optimizer registry the benchmark reads.
- :mod:`nestopt.bench`: the time-to-target benchmark, its report and the step-overhead meter.
"""

__version__ = "0.1.0"
