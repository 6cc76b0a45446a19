"""The subcommands of ``lcm-kit`` (one module each): ``generate``, ``eval``, ``quickstart``."""
