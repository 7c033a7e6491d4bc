"""Where users already train: each module is imported only when used, and needs its tool.

- :mod:`nestopt.integrations.telemetry`: :class:`~nestopt.integrations.telemetry.TelemetryWriter`
  writes any optimizer's (or a training guard's) ``telemetry()`` to TensorBoard and to CSV from a
  plain PyTorch loop (needs ``tensorboard`` for the former).
- :mod:`nestopt.integrations.lightning`: :class:`~nestopt.integrations.lightning.NestoptCallback`
  hands a loss-reading optimizer the mean micro-batch loss under ``accumulate_grad_batches`` and
  logs the telemetry to the trainer's loggers (needs ``lightning``).

Every nestopt optimizer exposes the values worth watching through one method, ``telemetry()``
(names to floats, read when called: no step pays for it), and takes the loss of a batch split in
micro-batches through ``observe_loss()``.
"""
