"""`python -m ratefleet` and the `ratefleet` command (pyproject's [project.scripts]): the CLI,
imported with the cyclic collector off (ratefleet/runtime/gctune.py `imports_without_gc`)."""

from ratefleet.runtime.gctune import imports_without_gc


def main() -> None:
    """Run the `ratefleet` command line (ratefleet/cli.py) on sys.argv."""
    with imports_without_gc():
        from ratefleet.cli import main as cli_main
    cli_main()


if __name__ == "__main__":
    main()
