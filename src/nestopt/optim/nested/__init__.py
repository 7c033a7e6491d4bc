r"""The nested optimizer: a small controller network sets a learning-rate multiplier per param
group while training runs, on top of any torch optimizer.

Each step, for every param group ``i``, the controller reads a feature vector ``x_i`` and outputs
``m_i`` in ``[lo, hi]`` (default 0.1x to 10x); the wrapped optimizer then steps with
``lr_i * m_i``, and ``lr_i`` is restored, so a torch ``LRScheduler`` still owns ``lr``::

    opt = NestedOptimizer(model.parameters(), base=torch.optim.AdamW, lr=1e-3, fused=True)
    def closure():
        opt.zero_grad(); loss = loss_fn(model(x), y); loss.backward(); return loss
    opt.step(closure)                  # the default signal (hindsight) needs the closure
    opt.observe_validation(val_loss)   # whenever you evaluate (optional)
    opt.multipliers()                  # current multiplier per group, for logging

The controller is shared by all groups (one row of features per group) and its last layer starts
at zero, so an untrained controller gives ``m = 1`` everywhere: ``NestedOptimizer`` then steps
exactly as its base does.

**Features** (``features=``, any subset of :data:`FEATURES`), per group:

====================  ===========================================================================
``grad_norm``         log RMS of the group's gradient (RMS, not norm: independent of group size)
``param_norm``        log RMS of the group's parameters, every ``stats_every`` steps, estimated
                      from the same sample as ``update_ratio`` (exact for tensors of <= 1024)
``depth``             relative depth: group index / (number of groups - 1), or ``group["depth"]``
``update_ratio``      log(||delta p|| / ||p||) of the last update, every ``stats_every`` steps,
                      from a fixed strided sample of about 1024 elements per tensor
``loss``              relative training-loss change and its moving average
``val``               relative validation-loss change, train/validation gap, and distance from the
                      validation moving average (fed by :meth:`NestedOptimizer.observe_validation`)
``curvature``         log of the secant curvature ||g_t - g_{t-1}|| / ||p_t - p_{t-1}|| (keeps the
                      previous gradient and parameters: 2 floats per parameter)
``mult``              the group's current multiplier, ``log m / max(-log lo, log hi)`` (in [-1, 1]),
                      so the controller can move it relative to where it is
====================  ===========================================================================

Any other feature is an object (:class:`~nestopt.optim.nested.Feature`), for example the trading
study's per-head losses, AUCs and gradient norms (:class:`nestopt.studies.head_features.HeadFeatures`,
fed by ``step(head_stats=...)``): a feature names the keyword of ``step`` it reads.

Every column but ``depth`` and ``mult`` is standardised by a running mean and variance (shared by the groups,
so differences between groups stay visible) and clipped to [-5, 5]: the controller sees the same
scale whatever the model's size or the loss's units. ``scratchpad=d`` gives the controller a
``d``-dimensional memory per group that it reads and rewrites every step
(``s_t = tanh(W [x_t, s_{t-1}])``, trained through one step).

**Signals** that train the controller (``signal=``):

- ``"hindsight"`` (default): every ``period`` steps, the last ``window`` steps are replayed from a
  snapshot with every multiplier of ``grid`` (0.1, 0.5, 1, 1.5, 2) applied on top of the
  multipliers that were used; each replay's end point is scored by the closure's loss on the
  *current* batch (one not used in the window), and the controller is trained with cross-entropy
  toward a grid point, relative to the multipliers it used, so repeated labels walk the
  multiplier across its whole range. The label is the grid point nearest ``label_shift`` (default
  2) times the best replay's multiplier: a greedy label over a few steps favours steps that are
  too small (the short-horizon bias; on a quadratic, the best multiplier along the displacement of
  a rate at the edge of stability is 1/2); ``nestopt study controller-variants`` measures it. Replay uses **cached gradients** (not cached batches): the
  window's gradients are kept and re-applied through the base optimizer, which needs no extra
  forward or backward pass for the replayed steps and keeps the caches serialisable. Memory:
  ``window`` gradient copies plus two snapshots of parameters and base state: for AdamW and
  ``window=8``, 8 + 2 x 3 = 14 floats per parameter at the peak. Compute: every ``period`` steps,
  ``len(grid) - 1`` replays of ``window`` base steps and one closure call each (the multiplier 1
  replay is the real trajectory, so its loss is the step's own). ``follow=f`` takes a share of
  each label directly: a scale shared by the groups is multiplied by ``label ** f`` after every
  replay and multiplies the controller's outputs (the product kept in ``mult_range``), and the
  controller is trained toward the remaining ``label ** (1 - f)``; ``follow=1`` is a line search
  over time on the learning rate with the controller left as it is.
- ``"proxy"``: the seed's indirect signal. The multiplier is explored (log-normal noise,
  ``explore``) and reinforced when the training loss fell more than its running average over the
  next step (REINFORCE with a baseline).
- ``"validation"``: the same with the reward "did the validation loss improve", one exploration
  draw held over each interval between :meth:`~NestedOptimizer.observe_validation` calls.
- ``"frozen"``: no training; weights from ``controller`` (for example ones meta-trained offline).
  Until nestopt ships meta-trained weights, the default frozen controller is the untrained one,
  which gives ``m = 1``: the base optimizer itself.

**Safety.** A non-finite loss or gradient skips the step entirely (no parameter, base state,
controller or multiplier changes; counted in ``opt.counters["nonfinite"]``), and a non-finite
feature or controller loss skips the controller's update and leaves the multipliers as they were
(``counters["controller_skipped"]``).

``state_dict()`` is the base optimizer's, with everything of the nested optimizer's own (the
controller's weights and its optimizer, the feature normaliser, the scratchpad, each feature's and
the signal's state, the hindsight caches and snapshots, the counters) under the first param
group's ``"nested"`` key: only torch's two keys, ``state`` and ``param_groups``, so torch's
distributed-checkpoint helpers carry it too (they load in place, into an optimizer that has
stepped: on one that has not, they first call ``step()`` without a closure, which the hindsight
signal refuses). A round trip continues bitwise, and a state saved in the layout before the
optimizer was in parts (a top-level ``"nested"`` entry) loads too.

The parts: :mod:`.wrapper` (the base step at ``lr * multiplier``, the only use of torch's private
hook registries), :mod:`.features`, :mod:`.signals` and :mod:`.hindsight` (one object per signal),
and the controller network (:class:`nestopt.nets.Controller`).
"""


from ...nets import Controller
from .features import DEFAULT_FEATURES, FEATURES, Feature, StepView
from .hindsight import hindsight_label
from .optimizer import DEFAULT_GRID, SIGNALS, NestedOptimizer

__all__ = ["DEFAULT_FEATURES", "DEFAULT_GRID", "FEATURES", "SIGNALS", "Controller", "Feature", "NestedOptimizer",
           "StepView", "hindsight_label"]
