"""The ``nestopt`` subcommands that live outside :mod:`nestopt.cli`, one module per command group.
Each module imports its heavy dependencies (torch, matplotlib) inside the command, so that
``nestopt --help`` and a usage error stay instant."""
