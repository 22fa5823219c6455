"""tools/bench.py's options in plain Python, parsed and checked before torch loads, and the
device-dependent defaults of those left out (tools/bench_run.py runs what they ask for)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from common.cli import CommandParser, option_name, path_option, positive
from common.compile_modes import COMPILE_MODES
from common.errors import DataError
from common.hardware import beyond_cores, physical_cores
from common.paths import holds_checkpoint, not_a_file, place_problem
from engine.config import PRECISIONS, too_wide
from loaders import LOADERS
from loaders.options import check_synthetic_memory, data_dir_option, synthetic_size_problem
from tools.options import add_device_option

SECTIONS = ("loaders", "peers", "step", "epoch", "mfu", "profile")
MEMORY_FORMATS = ("channels_last", "contiguous")  # the step section's --formats
STEP_PRECISIONS = ("fp32", "bf16", "fp16")  # the step section's default --precisions
TEST_IMAGES = 1_000  # size of the synthetic test split, which `build` loads but is never timed
TURN_S, TURN_EPOCHS = 0.2, 32  # a loader's turn (tools.timing.loader_turn): seconds, epochs
T = TypeVar("T")  # the value type of an argparse type below

# Options left out: (on CUDA, on CPU, with --quick). The help text is made from this table.
DEFAULTS: dict[str, tuple] = {
    "images": (50_000, 50_000, 2_048),
    "epoch_images": (50_000, 2_560, 256),
    "epochs": (2, 2, 1),
    "width": (64, 64, 8),
    "batch_size": (512, 256, 64),
    "batch_sizes": ([256, 1024], [128, 512], [32]),
    "compile": (["off", "on"], ["off", "on"], ["off"]),
    "compile_modes": (["default", "reduce-overhead"], ["default", "reduce-overhead"], []),
    "warmup_steps": (3, 3, 1),
    "steps": (20, 3, 2),
    "repeats": (3, 3, 1),
    "matmul_size": (8192, 2048, 1024),  # CUDA: large enough to fill an H100's tensor cores
    "matmul_seconds": (1.0, 1.0, 0.3),
    "peer_epoch_images": (50_000, 1_024, 256),
    "peer_width": (64, 64, 8),
    "profile_steps": (20, 3, 2),
}


def default_text(name: str) -> str:
    """DEFAULTS[name] as help text: '512 on CUDA, 256 on CPU, quick 64'."""
    def show(v) -> str:
        return (",".join(map(str, v)) or "none") if isinstance(v, list) else str(v)

    cuda, cpu, quick = (show(v) for v in DEFAULTS[name])
    both = cuda if cuda == cpu else f"{cuda} on CUDA, {cpu} on CPU"
    return f"default: {both}, quick {quick}"


def comma_separated(kind: Callable[[str], T]) -> Callable[[str], list[T]]:
    """An argparse type: comma-separated values of `kind`, named so in argparse's 'invalid
    comma-separated int value: 'a,b'' (a lambda's name made it 'invalid <lambda> value')."""
    def parse(text: str) -> list[T]:
        return [kind(v) for v in text.split(",") if v]
    parse.__name__ = f"comma-separated {kind.__name__}"
    return parse


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    """bench's options; those left out stay None until fill_defaults."""
    p = CommandParser(prog="python tools/bench.py", description=description,
                      epilog="Options left out take device-dependent defaults, smaller with "
                             "--quick.")
    add_device_option(p)
    names = comma_separated(str)
    p.add_argument("--sections", type=names, default=list(SECTIONS),
                   help=f"comma-separated subset of {','.join(SECTIONS)} (default: all)")
    file = path_option("name the current directory")
    p.add_argument("--json", type=file, help="also write every figure and the metadata here")
    p.add_argument("--quick", action="store_true",
                   help="small image counts and width 8, no compile: every section as a smoke test")
    p.add_argument("--data-dir", type=data_dir_option, default=Path("data"),
                   help="where the synthetic data and its .beton files are kept (default: ./data)")
    count, number = positive(int), positive(float)
    for name, kind, help_text in (
            ("images", count, "training images of the loaders section"),
            ("epoch-images", count, "training images of the epoch section"),
            ("epochs", count, "steady-state epochs after the warm-up one (loaders and peers "
                              f"sections: turns, in which each loader repeats its epoch until "
                              f"{TURN_S:g} s have passed, at most {TURN_EPOCHS} times)"),
            ("width", count, "ResNet-18 width"),
            ("batch-size", count, "batch size of every section but the peers' seed vs "
                                  "default epochs, which keep their presets' 128 and 512"),
            ("batch-sizes", comma_separated(count), "more batch sizes for the step section, at "
                                                    "the engine's defaults"),
            ("compile", names, "step section torch.compile settings (off,on)"),
            ("compile-modes", names, "torch.compile modes the step and epoch sections "
                                     "also time at the engine's defaults when those "
                                     "compile, besides the engine's own"),
            ("warmup-steps", count, "untimed steps first"),
            ("steps", count, "timed steps per block"),
            ("repeats", count, "timed blocks of steps and of matmuls; the fastest counts"),
            ("matmul-size", count, "n of the peak n x n matmul"),
            ("matmul-seconds", number, "time spent on each peak measurement"),
            ("peer-epoch-images", count, "training images of the peers section's seed vs "
                                         "default epochs"),
            ("peer-width", count, "ResNet-18 width of the peers section's epochs"),
            ("profile-steps", count, "training steps the profile section records, after "
                                     "--warmup-steps")):
        p.add_argument(f"--{name}", type=kind,
                       help=f"{help_text} ({default_text(name.replace('-', '_'))})")
    p.add_argument("--precisions", type=names, default=list(STEP_PRECISIONS),
                   help=f"step section precisions (default: {','.join(STEP_PRECISIONS)})")
    p.add_argument("--formats", type=names, default=list(MEMORY_FORMATS),
                   help=f"step section memory formats (default: {','.join(MEMORY_FORMATS)})")
    p.add_argument("--profile-loader", choices=LOADERS,
                   help="the loader feeding the profile section's steps (default: the "
                        "engine's for the device: resident on CUDA, ffcv on CPU)")
    p.add_argument("--trace", type=file, help="the profile section's gzipped Chrome trace "
                                              "(default: beside --json, as NAME.trace.json.gz)")
    p.add_argument("--workers", type=count, help="loader workers (default: cores available)")
    p.add_argument("--threads", type=count, default=physical_cores(),
                   help="torch intra-op threads for the step, epoch and mfu sections "
                        "(default: physical cores available; hyper-threads count once)")
    return p


IMAGE_COUNTS = ("images", "epoch_images", "peer_epoch_images")  # synthetic training splits


def parse_args(argv: list[str], description: str | None = None) -> argparse.Namespace:
    """The command line, its values checked before any section runs; `description` heads
    --help."""
    p = build_parser(description)
    args = p.parse_args(argv)
    for option, given, known in (("--sections", args.sections, SECTIONS),
                                 ("--precisions", args.precisions, PRECISIONS),
                                 ("--formats", args.formats, MEMORY_FORMATS),
                                 ("--compile", args.compile or [], ("off", "on")),
                                 ("--compile-modes", args.compile_modes or [], COMPILE_MODES)):
        if unknown := [x for x in given if x not in known]:
            p.error(f"{option}: unknown value(s) {', '.join(unknown)}; choose from "
                    f"{', '.join(known)}")
    for name in ("sections", "precisions", "formats", "compile", "batch_sizes"):
        if getattr(args, name) == []:
            p.error(f"{option_name(name)} needs at least one value")
    for name in IMAGE_COUNTS:  # named as bench's options, not as engine/train.py's
        if (n := getattr(args, name)) is not None:
            option = option_name(name)
            if problem := synthetic_size_problem(n, TEST_IMAGES):  # else all its rows fail
                p.error(f"{option} {n}: {problem}")
            try:
                check_synthetic_memory(n, TEST_IMAGES, option, str(n))
            except DataError as error:
                p.error(str(error))
    for name in ("threads", "workers"):
        if (n := getattr(args, name)) is not None and (
                problem := beyond_cores(option_name(name), n)):
            p.error(problem)
    for name in ("width", "peer_width"):  # else a traceback from building the model
        if (n := getattr(args, name)) is not None and (problem := too_wide(option_name(name), n)):
            p.error(problem)
    for option, path, name in (("--json", args.json, "bench.json"),
                               ("--trace", args.trace, "bench.trace.json.gz")):
        if path is not None and (problem := not_a_file(path)):
            example = f", e.g. {path / name}" if path.is_dir() else ""
            p.error(f"{option} {path} {problem}; name a file{example}")
        if path is not None and holds_checkpoint(path):  # --json is written after a section
            p.error(f"{option} {path} is a cifar10-engine checkpoint; the results would "
                    f"overwrite it. Name another file")
    for option, path in (("--json", args.json), ("--trace", args.trace)):
        # both writers make the folders missing above their file (bench_run, write_trace)
        if path is not None and (problem := place_problem(path, folders_made=True)):
            p.error(f"{option} {path}: {problem}; name a file in a writable folder")
    return args


def fill_defaults(args: argparse.Namespace) -> None:
    """Give the options left out their values for this device and mode."""
    column = 2 if args.quick else 0 if args.device == "cuda" else 1
    for name, values in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, values[column])
