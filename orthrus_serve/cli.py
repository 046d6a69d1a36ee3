"""`orthrus-serve`: the serving command line. Until the serving layer lands it only offers the
engine's `generate`."""

import sys


def main(argv: list[str] | None = None) -> int:
    from orthrus_engines.cli import main as engine_main

    return engine_main(argv if argv is not None else sys.argv[1:])
