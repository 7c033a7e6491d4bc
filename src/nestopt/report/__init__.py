"""Published results: every number the README and the documentation quote, from a stored run.

- :mod:`~nestopt.report.published`: which commands' results the docs cite, cheap or expensive;
- :mod:`~nestopt.report.codehash`: the files each command runs, and one hash over them;
- :mod:`~nestopt.report.store`: run a command, keep its result and provenance in ``docs/results/``;
- :mod:`~nestopt.report.compare`: a rerun against the stored result (steps and verdicts exactly,
  times within a factor);
- :mod:`~nestopt.report.blocks`: the generated blocks of the Markdown files, and their renderers
  (:mod:`~nestopt.report.render`);
- :mod:`~nestopt.report.command`: ``nestopt report --run / --docs / --check``.
"""
