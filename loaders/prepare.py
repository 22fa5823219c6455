"""`python loaders/prepare.py` (also `-m loaders.prepare`, `cifar-prepare`): download
(when needed), validate and convert a dataset to .beton files, and print their paths. Training
calls `prepare` too, so both take the same path."""

from __future__ import annotations

import sys
from pathlib import Path

from common.cli import CommandParser, interruptible_imports, run_main
from common.streams import say
from loaders.options import SYNTHETIC_SIZE, add_data_arguments, synthetic_size_unused


def main(argv: list[str] | None = None) -> int:
    """Prepare the dataset the command line names and print its two .beton paths; the options
    are parsed first, so --help and a refused value answer before numpy and torch load."""
    parser = CommandParser(prog="python loaders/prepare.py", description=__doc__)
    add_data_arguments(parser)
    parser.set_defaults(dataset="cifar10", data_dir=Path("data"))
    args = parser.parse_args(argv)
    if args.synthetic_size is not None and (problem := synthetic_size_unused(args.dataset)):
        parser.error(problem)
    with interruptible_imports():  # numpy, FFCV and torch take seconds to import
        from loaders.preparation import prepare

    def body() -> None:
        size = tuple(args.synthetic_size or SYNTHETIC_SIZE)
        prepared = prepare(args.dataset, args.data_dir, size)
        say(str(prepared.train))
        say(str(prepared.test))

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
