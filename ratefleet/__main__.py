"""`python -m ratefleet` and the `ratefleet` command (pyproject's [project.scripts]): the CLI,
imported with the cyclic collector off (ratefleet/runtime/gctune.py `imports_without_gc`).

A fleet process (`ratefleet up|dispatcher|worker|gateway`, ratefleet/cli_roles.py ROLE_COMMANDS)
imports only the commands that run one; every other command line imports the whole CLI
(ratefleet/cli.py). Both run the same command functions with the same options."""

import sys

from ratefleet.runtime.gctune import imports_without_gc


def main() -> None:
    """Run the `ratefleet` command line on sys.argv."""
    with imports_without_gc():
        from ratefleet.cli_roles import ROLE_COMMANDS  # (the whole CLI imports it too)

        if len(sys.argv) > 1 and sys.argv[1] in ROLE_COMMANDS:
            from ratefleet.cli_roles import main as cli_main
        else:
            from ratefleet.cli import main as cli_main
    cli_main()


if __name__ == "__main__":
    main()
