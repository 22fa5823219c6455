"""TrainConfig, its presets and the command line of engine/train.py (torchvision style).

Plain Python, like the option names it offers: a command line is parsed, and --help or a
refused value answered, before torch loads (seconds); the command imports it afterwards."""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from common.cli import CommandParser, interruptible_imports, option_name, path_option
from common.compile_modes import COMPILE_MODES
from common.files import timestamped
from common.hardware import beyond_cores, launched_processes
from loaders import LOADERS
from loaders.options import (
    SYNTHETIC_SIZE,
    AugmentConfig,
    add_data_arguments,
    seed_problem,
    synthetic_size_problem,
    synthetic_size_unused,
)

# the names engine.model and engine.optimizers build from, here so options parse without torch
ARCHS = ("resnet18",)
OPTIMIZERS = ("sgd", "nesterov", "adam", "adamw", "rmsprop")
SCHEDULES = ("onecycle", "cosine", "step", "triangular", "constant")
WARMUP_SCHEDULES = ("onecycle", "triangular")  # the schedules engine.optimizers.lr_at warms up
PRECISIONS = ("bf16", "fp16", "fp32")  # engine.run.DTYPES gives their torch dtypes
# the largest float32: the optimizers scale float32 weights' steps by the LR and weight decay,
# and a larger value is a traceback from inside the first step ("cannot be converted to type
# float without overflow")
FLOAT32_MAX = 3.4028234663852886e38


def trackers() -> list[str]:
    """What accelerate's log_with takes; asked of accelerate itself, which imports torch, so
    only when --log-with is given or a saved config is checked."""
    with interruptible_imports():
        from accelerate.utils import LoggerType
    return [t.value for t in LoggerType]


def _tracker(value: str) -> str:
    names = trackers()
    if value not in names:
        raise argparse.ArgumentTypeError(
            f"invalid choice: {value!r} (choose from {', '.join(names)})")
    return value


@dataclass
class TrainConfig:
    """Every choice of a run; saved in config.json and ckpt.pt, so a run can be redone."""

    preset: str = "fast"
    dataset: str = "cifar10"
    data_dir: str = "data"
    synthetic_size: tuple[int, int] = SYNTHETIC_SIZE
    loader: str | None = None  # None: resident on GPU, ffcv otherwise
    workers: int | None = None  # None: the cores this process may use
    arch: str = "resnet18"
    width: int = 64
    epochs: int = 24
    batch_size: int = 512
    optimizer: str = "nesterov"
    lr: float | str = 0.2  # a number, or "auto": run the LR range test first
    lr_auto: dict | None = None  # set by --lr auto: the range test's suggestions
    schedule: str = "triangular"
    warmup: float = 0.2
    momentum: float = 0.9
    weight_decay: float = 5e-4
    decay_norm_bias: bool = False
    label_smoothing: float = 0.2
    flip: bool = AugmentConfig.flip
    translate: int = AugmentConfig.translate
    pad_mode: str = "reflect"
    cutout: int = 0
    precision: str | None = None  # None: resolve's default_precision
    compile: bool | None = None  # None: on for CUDA
    compile_mode: str | None = None  # None: reduce-overhead on one GPU, default elsewhere
    channels_last: bool = True
    tta: bool = True
    seed: int = 0
    deterministic: bool = False  # torch's deterministic algorithms (cuDNN's, on CUDA)
    cudnn_benchmark: bool = True  # cuDNN times its algorithms per shape (not if deterministic)
    out: str | None = None  # None: runs/<dataset>-<time>
    log_with: str | None = None

    def __post_init__(self):
        # config.json and ckpt.pt store tuples as lists: re-type them once, here
        self.synthetic_size = tuple(self.synthetic_size)

    def autotunes(self) -> bool:
        """Whether cuDNN times its algorithms (--cudnn-benchmark): never in a --deterministic
        run, since autotuning may time its way to another algorithm in another process."""
        return self.cudnn_benchmark and not self.deterministic

    def augment(self) -> AugmentConfig:
        """The augmentation options as loaders.augment takes them (it checks their ranges)."""
        return AugmentConfig(flip=self.flip, translate=self.translate,
                             reflect=self.pad_mode == "reflect", cutout=self.cutout)

    def to_dict(self) -> dict:
        """Every field by name: what config.json and ckpt.pt store, so a run can be redone."""
        return asdict(self)


# Where the default ("fast") choices come from; what is not credited below is our own.
# - nesterov SGD (momentum 0.9) at lr 0.2 for a batch of about 500, weight decay 5e-4, and a
#   triangular LR peaking at 20% of the steps and ending at 0: Keller Jordan's ResNet-18
#   baseline (github.com/KellerJordan/cifar10-zoo, airbench/baselines/train_resnet18_94.py:
#   26 epochs at batch 500, 94% with its TTA level 2, "51 seconds on an A100", 2.10 s/epoch).
#   That schedule starts at 0.2 of the peak; ours starts at 1/(W+1) of it (engine/optimizers.py).
#   lr 0.2 at batch 512 is also the linear scaling rule, 0.1 per 256 images (Goyal et al. 2017).
# - label smoothing 0.2 and flip + 2-pixel reflect translate: airbench94's hyp['opt'] and
#   hyp['aug'] (github.com/KellerJordan/cifar10-airbench). airbench94 flips alternately (a
#   random flip once, then all images every other epoch); ours draws a random flip every epoch.
#   The ResNet-18 baseline above uses no label smoothing and translate 4 with cutout 12.
# - flip test-time augmentation: level 1 of those scripts' tta_level; both use level 2
#   (mirror + 1-pixel translations). Ours is the cheaper level 1.
# - no weight decay on BatchNorm and biases: He et al., "Bag of Tricks" (2019), sec. 3.1.
#   Both scripts above decay every parameter (airbench94 with a scaled LR for BN biases).
# - 24 epochs: ours, two fewer than the ResNet-18 baseline's 26.
PRESETS: dict[str, dict] = {
    "fast": {},
    # The seed notebook: plain SGD, fixed LR, batch 128, 20 epochs, torchvision-style augmentation.
    "seed": dict(optimizer="sgd", lr=0.01, momentum=0.9, schedule="constant", batch_size=128,
                 epochs=20, weight_decay=0.0, label_smoothing=0.0, translate=4,
                 pad_mode="zeros", tta=False),
}


def _lr(value: str) -> float | str:
    if value == "auto":
        return value
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got '{value}'") from None


def build_parser(tool: str | None = None) -> argparse.ArgumentParser:
    """engine/train.py's options; for another `tool` that trains (lr_find, compare), the same
    but --resume, which continues one run, and with that tool's --out."""
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
    g.add_argument("--pad-mode", choices=("reflect", "zeros"), help="padding for --translate")
    g.add_argument("--cutout", type=int, help="side of the cutout square; 0 = off")
    g = p.add_argument_group("model and optimization")
    g.add_argument("--arch", choices=ARCHS, help="architecture")
    g.add_argument("--width", type=int, help="channels of the first stage (64 = ResNet-18)")
    g.add_argument("--epochs", type=int, help="training epochs")
    g.add_argument("--batch-size", type=int, help="images per step on each process")
    g.add_argument("--optimizer", choices=OPTIMIZERS, help="optimizer")
    g.add_argument("--lr", type=_lr, help="peak learning rate, or 'auto' for the LR range test")
    g.add_argument("--schedule", choices=SCHEDULES, help="LR schedule, stepped per batch")
    g.add_argument("--warmup", type=float,
                   help=f"fraction of steps spent warming up ({' and '.join(WARMUP_SCHEDULES)} "
                        "only)")
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
    return p


def _fits(value: object, hint: object) -> bool:
    """Whether value has the type a TrainConfig field's annotation names (an int is a float)."""
    if isinstance(hint, types.UnionType):
        return any(_fits(value, h) for h in typing.get_args(hint))
    if typing.get_origin(hint) is tuple:
        items = typing.get_args(hint)
        return isinstance(value, tuple) and len(value) == len(items) and all(
            _fits(v, h) for v, h in zip(value, items, strict=True))
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    return value is None if hint is type(None) else isinstance(value, hint)


def foreign_values(cfg: TrainConfig) -> list[str]:
    """Fields of another type than declared, or outside the command line's choices: never
    from the command line (argparse types and checks it), so from a damaged checkpoint."""
    hints = typing.get_type_hints(TrainConfig)
    wrong = [f"{name} is {getattr(cfg, name)!r}, not {hint}" for name, hint in hints.items()
             if not _fits(getattr(cfg, name), hint)]
    choices = {a.dest: a.choices for a in build_parser()._actions if a.choices}
    choices["log_with"] = trackers()
    return wrong or [f"{name} is {getattr(cfg, name)!r}, not one of {', '.join(options)}"
                     for name, options in choices.items()
                     if getattr(cfg, name) not in (None, *options)]


def validate(cfg: TrainConfig) -> list[str]:
    """Impossible or contradictory values, as messages a user can act on."""
    problems = []
    for name in ("epochs", "batch_size", "width"):
        if getattr(cfg, name) < 1:
            problems.append(f"{option_name(name)} must be at least 1")
    if cfg.lr != "auto" and not (isinstance(cfg.lr, float | int) and 0 < cfg.lr <= FLOAT32_MAX):
        problems.append(f"--lr must be a positive finite number no larger than {FLOAT32_MAX:.2g} "
                        f"(the float32 weights' largest) or 'auto', got {cfg.lr}")
    if not 0 <= cfg.label_smoothing < 1:
        problems.append("--label-smoothing must be in [0, 1)")
    if not 0 <= cfg.warmup < 1:
        problems.append("--warmup must be in [0, 1)")
    if not 0 <= cfg.weight_decay <= FLOAT32_MAX:
        problems.append(f"--weight-decay must be a finite number >= 0 no larger than "
                        f"{FLOAT32_MAX:.2g} (the float32 weights' largest), got {cfg.weight_decay}")
    if not 0 <= cfg.momentum < 1:
        problems.append(f"--momentum must be in [0, 1), got {cfg.momentum}")
    if problem := seed_problem(cfg.seed):
        problems.append(problem)
    try:
        cfg.augment()
    except ValueError as error:  # AugmentConfig owns the augmentation ranges
        problems.append(str(error))
    if cfg.compile is False and cfg.compile_mode not in (None, "default"):
        problems.append(f"--compile-mode {cfg.compile_mode} compiles; drop --no-compile")
    if cfg.workers is not None and cfg.workers < 1:
        problems.append("--workers must be at least 1")
    if problem := synthetic_size_problem(*cfg.synthetic_size):
        problems.append(f"--synthetic-size {' '.join(map(str, cfg.synthetic_size))}: {problem}")
    return problems


# What --resume DIR may change: how long to train, where the data and workers are, the
# trackers, and how the same computation runs (compiled or not, its mode, determinism, cuDNN's
# autotuning). Everything else would make the continued run a different run.
RESUMABLE = ("epochs", "data_dir", "workers", "log_with", "compile", "compile_mode",
             "deterministic", "cudnn_benchmark")


@dataclass
class Options:
    """A parsed command line: the run's config, --resume, and the options given explicitly."""

    cfg: TrainConfig
    resume: Path | None
    given: dict  # option name (TrainConfig field) -> value typed on the command line


def _plain(value: object) -> object:
    """An option's value as config.json holds it: paths as strings, lists as tuples."""
    return str(value) if isinstance(value, Path) else tuple(value) if isinstance(
        value, list) else value


def parse(argv: list[str] | None = None, prog: str | None = None) -> Options:
    """The run's config from the command line (preset, then explicit options) and --resume;
    `prog` names the tool in usage errors when another tool's options are parsed here."""
    parser = build_parser()
    parser.prog = prog or parser.prog
    args = vars(parser.parse_args(argv))
    resume = args.pop("resume")
    names = {f.name for f in fields(TrainConfig)}
    given = {k: _plain(v) for k, v in args.items() if k in names and v is not None}
    if given.get("compile_mode", "default") != "default":
        given.setdefault("compile", True)  # a mode asks for compiling, on the CPU too
    preset = given.get("preset", "fast")
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
    at the peak LR), --pad-mode with no --translate to pad for. Taken and ignored, the run
    would not be the one asked for (timm and torchvision's reference warm up any schedule)."""
    problems = []
    if "warmup" in given and cfg.schedule not in WARMUP_SCHEDULES:
        problems.append(f"--warmup is for --schedule {' or '.join(WARMUP_SCHEDULES)}; "
                        f"{cfg.schedule} has no warm-up, leave --warmup out")
    if "pad_mode" in given and not cfg.translate:
        problems.append("--pad-mode pads for --translate, which is 0; leave --pad-mode out")
    return problems


def resume_config(saved: dict, given: dict, run_dir: Path) -> TrainConfig:
    """The config a --resume continues: the saved one, with the RESUMABLE options applied.

    Any other option given on the command line is refused by name rather than dropped.
    """
    refused = sorted(k for k, v in given.items()
                     if k not in RESUMABLE and _plain(saved.get(k)) != v
                     and not (k == "lr" and v == "auto" and saved.get("lr_auto")))  # its origin
    if refused:
        names = ", ".join(map(option_name, refused))
        allowed = ", ".join(map(option_name, RESUMABLE))
        raise ValueError(f"{names} cannot change when resuming {run_dir}, which continues with "
                         f"its saved config; only {allowed} can. Start a new run with another "
                         "--out to change the rest.")
    changes = {k: v for k, v in given.items() if k in RESUMABLE}
    if changes.get("compile") is False:  # --no-compile: no mode left to compile in
        changes.setdefault("compile_mode", "default")
    return TrainConfig(**{**saved, **changes, "out": str(run_dir)})


def resolve(cfg: TrainConfig, cuda: bool, processes: int | None = None,
            bf16: bool = True) -> TrainConfig:
    """cfg with the choices that depend on the hardware filled in, so config.json records what
    ran: loader, precision, compile and its mode, and the default run folder. `processes`:
    the run's, by default as launched (WORLD_SIZE). `bf16`: whether the GPU computes bf16
    natively (common.hardware.native_bf16); where not, fp16 with the loss scaler is the default.

    One CUDA process compiles with CUDA graphs (reduce-overhead): on the first H200 run, a step
    in the default mode kept the GPU busy 6.3 ms of its 14.5; the rest of the time the GPU
    waited while the host launched kernels (BENCHMARKS.md, GPU). Several processes keep the
    default mode: under DDP, BatchNorm's buffers are mutated inputs, for which CUDA graphs are
    skipped and the step slows down (pytorch/pytorch#139207)."""
    compile = cuda if cfg.compile is None else cfg.compile
    processes = launched_processes() if processes is None else processes
    return replace(cfg, loader=cfg.loader or ("resident" if cuda else "ffcv"),
                   precision=cfg.precision or default_precision(cuda, bf16), compile=compile,
                   compile_mode=cfg.compile_mode or default_compile_mode(cuda, compile,
                                                                         processes),
                   out=cfg.out or timestamped(cfg.dataset))


def default_precision(cuda: bool, bf16: bool) -> str:
    """--precision where none is asked for: bf16 on a GPU that has it natively, else fp16 (with
    the loss scaler); fp32 on the CPU."""
    return ("bf16" if bf16 else "fp16") if cuda else "fp32"


def default_compile_mode(cuda: bool, compile: bool, processes: int) -> str:
    """torch.compile's mode where none is asked for: CUDA graphs for one CUDA process (see
    resolve), torch's default mode elsewhere."""
    return "reduce-overhead" if cuda and compile and processes == 1 else "default"


def parse_tool_args(argv: list[str] | None, prog: str, description: str,
                    own: argparse.ArgumentParser, check: Callable[[argparse.Namespace], None],
                    ) -> tuple[argparse.Namespace, TrainConfig]:
    """A tool's options (`own`, add_help=False) beside every option of engine/train.py.

    Returns the raw namespace (None where an option was left out) and the TrainConfig that
    engine.config.parse makes of the training options, presets and validation included.
    `check` raises ValueError for a bad combination of the tool's options: a usage error.
    """
    tool = Path(prog).stem
    full = CommandParser(prog=prog, description=description, add_help=False,
                         parents=[build_parser(tool), own], allow_abbrev=False)
    args = full.parse_args(argv)  # --help lists every option; a bad one of either exits here
    try:
        check(args)
    except ValueError as error:
        full.error(str(error))
    _, rest = own.parse_known_args(argv)
    cfg = parse(rest, prog).cfg
    cfg.out = cfg.out or timestamped(tool)
    return args, cfg
