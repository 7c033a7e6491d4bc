"""Learning-rate schedules (pure ``t -> lr`` functions) and the large-learning-rate recipe.

    >>> from nestopt.schedule import LargeLRConfig, LargeLRScheduler
    >>> cfg = LargeLRConfig()                  # the note's defaults: 0.01 -> 0.3 over 5 epochs, cosine to 1e-5
    >>> s = cfg.schedule(); s(0), s(5)
    (0.01, 0.3)
"""

from .functions import (Constant, Cosine, Exponential, Join, Linear, Schedule, StepDecay, constant, cosine,
                        exponential, join, linear, step_decay, warmup_then)
from .grid import GridResult, grid_search
from .large_lr import LargeLRConfig, LargeLRScheduler

__all__ = ["GridResult", "grid_search", "Constant", "Cosine", "Exponential", "Join", "LargeLRConfig", "LargeLRScheduler", "Linear", "Schedule",
           "StepDecay", "constant", "cosine", "exponential", "join", "linear", "step_decay", "warmup_then"]
