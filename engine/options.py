"""The command line of engine/train.py (torchvision style), and of the tools that train
(lr_find, compare): every option of a TrainConfig, parsed and checked.

Plain Python, like engine.config: a command line is parsed, and --help or a refused value
answered, before torch loads (seconds); the command imports it afterwards."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from common.cli import CommandParser, interruptible_imports, path_option
from common.compile_modes import COMPILE_MODES
from common.hardware import beyond_cores
from common.output_folders import timestamped
from engine.config import (
    ARCHS,
    AUTOTUNE_REFUSED,
    CONFIG_KEYS,
    OPTIMIZERS,
    PAD_MODES,
    PRECISIONS,
    PRESETS,
    SCHEDULES,
    WARMUP_SCHEDULES,
    TrainConfig,
    field_value,
    validate,
)
from loaders import LOADERS
from loaders.options import add_data_arguments, synthetic_size_unused


def _tracker(value: str) -> str:
    """--log-with's type: one of accelerate's trackers, which are asked for only when given:
    accelerate imports torch (seconds), which the command line's guard surrounds."""
    with interruptible_imports():
        from engine.trackers import tracker_names
    names = tracker_names()
    if value not in names:
        raise argparse.ArgumentTypeError(
            f"invalid choice: {value!r} (choose from {', '.join(names)})")
    return value


def _lr(value: str) -> float | str:
    """--lr's type: a number, or 'auto' for the LR range test."""
    if value == "auto":
        return value
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got '{value}'") from None


def build_parser(tool: str | None = None, decided: tuple[str, ...] = (),
                 refused: dict[str, str] | None = None) -> argparse.ArgumentParser:
    """engine/train.py's options; for another `tool` that trains (lr_find, compare), the same
    but --resume, which continues one run, and with that tool's --out. `decided`: the options
    that tool sets (or refuses) its own way, whose help then gives no preset's value;
    `refused`: those it refuses, each with why, which its help says instead of what the
    option does in a training run."""
    p = CommandParser(
        prog="engine/train.py",
        description="Train a CIFAR ResNet-18 (accelerate launch engine/train.py, or plain python).",
        epilog="Options left out take their values from --preset (default: fast).")
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="starting values; any option given here overrides them (default: fast)")
    add_data_arguments(p)
    g = p.add_argument_group("data loading and augmentation")
    g.add_argument("--loader", choices=LOADERS, help="default: resident on GPU, ffcv on CPU")
    g.add_argument("--workers", type=int, help="loader CPU workers (default: cores available)")
    g.add_argument("--flip", action=argparse.BooleanOptionalAction, help="random horizontal flip")
    g.add_argument("--translate", type=int, help="random shift in pixels (pad and crop); 0 = off")
    g.add_argument("--pad-mode", choices=PAD_MODES, help="padding for --translate")
    g.add_argument("--cutout", type=int, help="side of the cutout square; 0 = off")
    g = p.add_argument_group("model and optimization")
    g.add_argument("--arch", choices=ARCHS, help="architecture")
    g.add_argument("--width", type=int, help="channels of the first stage; 64 is ResNet-18")
    g.add_argument("--epochs", type=int, help="training epochs")
    g.add_argument("--batch-size", type=int, help="images per step on each process")
    g.add_argument("--optimizer", choices=OPTIMIZERS, help="optimizer")
    g.add_argument("--lr", type=_lr, help="peak learning rate, or 'auto' for the LR range test")
    g.add_argument("--schedule", choices=SCHEDULES, help="LR schedule, stepped per batch")
    g.add_argument("--warmup", type=float,
                   help=f"fraction of steps spent warming up, for "
                        f"{' and '.join(WARMUP_SCHEDULES)} only")
    g.add_argument("--momentum", type=float, help="momentum (SGD, RMSprop) or beta1 (Adam)")
    g.add_argument("--weight-decay", type=float, help="weight decay")
    g.add_argument("--decay-norm-bias", action=argparse.BooleanOptionalAction,
                   help="also decay BatchNorm and bias parameters")
    g.add_argument("--label-smoothing", type=float, help="label smoothing of the training loss")
    g = p.add_argument_group("numerics and hardware")
    g.add_argument("--precision", choices=PRECISIONS,
                   help="default: bf16 on GPU (fp16 below compute capability 8.0), fp32 on "
                        "CPU; fp16 uses a loss scaler")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction,
                   help="torch.compile the model (default: on for CUDA)")
    g.add_argument("--compile-mode", choices=COMPILE_MODES,
                   help="torch.compile mode; any but default implies --compile (default: "
                        "reduce-overhead, which replays CUDA graphs, in a one-process CUDA "
                        "run; default elsewhere); max-autotune also tunes kernels")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction,
                   help="channels_last memory format")
    g.add_argument("--tta", action=argparse.BooleanOptionalAction,
                   help="flip test-time augmentation at evaluation")
    g.add_argument("--seed", type=int, help="seed of initialization, order and augmentation")
    g.add_argument("--deterministic", action=argparse.BooleanOptionalAction,
                   help="runs that repeat on CUDA too: torch's deterministic algorithms, "
                        "cuDNN's among them (slower); an op without one warns")
    g.add_argument("--cudnn-benchmark", action=argparse.BooleanOptionalAction,
                   help="cuDNN times its convolution algorithms at each new input shape and "
                        "keeps the fastest (default: on; off with --deterministic)")
    g = p.add_argument_group("output")
    g.add_argument("--out", type=path_option("write the run into the current directory"),
                   help=f"run directory (default: runs/{tool or '<dataset>'}-<time>)")
    if tool is None:
        g.add_argument("--resume", type=path_option("resume the current directory"),
                       help="continue the interrupted run in this directory with its saved config")
    g.add_argument("--log-with", type=_tracker, metavar="TRACKER",
                   help="an accelerate tracker, e.g. tensorboard or wandb (its package "
                        "installed)")
    _show_preset_values(p, decided)
    for action in p._actions:
        if refused and action.dest in refused:
            action.help = f"refused here: {refused[action.dest]}"
    return p


def _show_preset_values(parser: argparse.ArgumentParser, decided: tuple[str, ...]) -> None:
    """End the help of each option that a preset sets, and whose help names no default, with
    the value it takes when left out, and another preset's where that differs: --help did not
    say that a run trains 24 epochs at lr 0.2. Not for the options in `decided`."""
    default = TrainConfig.preset
    values = {name: TrainConfig(**overrides).to_dict() for name, overrides in PRESETS.items()}
    for action in parser._actions:
        value = values[default].get(action.dest)
        if (value is None or action.dest in decided or action.help is None
                or "default" in action.help):
            continue
        others = "".join(f"; --preset {name}: {_shown(preset[action.dest])}"
                         for name, preset in values.items() if preset[action.dest] != value)
        action.help = f"{action.help} (default: {_shown(value)}{others})"


def _shown(value: object) -> str:
    """An option's value as --help gives it: on or off, 5e-04 as 0.0005, else as typed."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"{value:g}" if isinstance(value, float) else str(value)


@dataclass
class Options:
    """A parsed command line: the run's config, --resume, and the options given explicitly."""

    cfg: TrainConfig
    resume: Path | None
    given: dict  # option name (TrainConfig field) -> value typed on the command line


def parse(argv: list[str] | None = None, prog: str | None = None) -> Options:
    """The run's config from the command line (preset, then explicit options) and --resume;
    `prog` names the tool in usage errors when another tool's options are parsed here."""
    parser = build_parser()
    parser.prog = prog or parser.prog
    args = vars(parser.parse_args(argv))
    resume = args.pop("resume")
    given = {k: field_value(v) for k, v in args.items() if k in CONFIG_KEYS and v is not None}
    if given.get("compile_mode", "default") != "default":
        given.setdefault("compile", True)  # a mode asks for compiling, on the CPU too
    preset = given.get("preset", TrainConfig.preset)
    cfg = TrainConfig(**{**PRESETS[preset], "preset": preset, **given})
    problems = validate(cfg)  # of any config; this machine's cores only bound the command's
    if "workers" in given and (problem := beyond_cores("--workers", cfg.workers)):
        problems.append(problem)
    if "synthetic_size" in given and resume is None and (
            problem := synthetic_size_unused(cfg.dataset)):
        problems.append(problem)
    problems += unused_options(cfg, given) if resume is None else []
    if problems:
        parser.error("; ".join(problems))
    return Options(cfg, resume, given)


def unused_options(cfg: TrainConfig, given: dict) -> list[str]:
    """Options typed on the command line that cfg's other choices leave with nothing to do,
    as messages: --warmup beside a schedule with no warm-up (cosine, step and constant start
    at the peak LR), --pad-mode with no --translate to pad for, --cudnn-benchmark in a
    --deterministic run (which never autotunes). Taken and ignored, the run would not be the
    one asked for (timm and torchvision's reference warm up any schedule)."""
    problems = []
    if "warmup" in given and cfg.schedule not in WARMUP_SCHEDULES:
        problems.append(f"--warmup is for --schedule {' or '.join(WARMUP_SCHEDULES)}; "
                        f"{cfg.schedule} has no warm-up, leave --warmup out")
    if "pad_mode" in given and not cfg.translate:
        problems.append("--pad-mode pads for --translate, which is 0; leave --pad-mode out")
    if given.get("cudnn_benchmark") and cfg.deterministic:
        problems.append(f"{AUTOTUNE_REFUSED} (another run may time its way to others); "
                        "leave one out")
    return problems


def parse_tool_args(argv: list[str] | None, prog: str, description: str,
                    own: argparse.ArgumentParser, check: Callable[[argparse.Namespace], None],
                    decided: tuple[str, ...], refused: dict[str, str] | None = None
                    ) -> tuple[argparse.Namespace, TrainConfig]:
    """A tool's options (`own`, add_help=False) beside every option of engine/train.py.

    Returns the raw namespace (None where an option was left out) and the TrainConfig that
    parse makes of the training options, presets and validation included.
    `check` raises ValueError for a bad combination of the tool's options: a usage error.
    `decided`: the training options the tool sets or refuses itself, and `refused` those it
    refuses with why, for its --help (build_parser).
    """
    tool = Path(prog).stem
    full = CommandParser(prog=prog, description=description, add_help=False,
                         parents=[build_parser(tool, decided, refused), own])
    args = full.parse_args(argv)  # --help lists every option; a bad one of either exits here
    try:
        check(args)
    except ValueError as error:
        full.error(str(error))
    _, rest = own.parse_known_args(argv)
    cfg = parse(rest, prog).cfg
    cfg.out = cfg.out or timestamped(tool)
    return args, cfg
