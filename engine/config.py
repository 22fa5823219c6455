"""TrainConfig, every choice of a run: its presets, the checks of its values, and the choices
the hardware resolves (loader, precision, compile mode) once the run's machine is known.

Plain Python, like the option names it offers: engine.options parses a command line into it,
and answers --help or a refused value, before torch loads (seconds)."""

from __future__ import annotations

import math
import re
import types
import typing
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from common.cli import option_name
from common.compile_modes import COMPILE_MODES
from common.hardware import launched_processes
from common.output_folders import timestamped
from loaders import LOADERS
from loaders.options import (
    DATASETS,
    SYNTHETIC_SIZE,
    AugmentConfig,
    seed_problem,
    synthetic_size_problem,
)

# the names engine.model and engine.optimizers build from, here so options parse without torch
ARCHS = ("resnet18",)
OPTIMIZERS = ("sgd", "nesterov", "adam", "adamw", "rmsprop")
SCHEDULES = ("onecycle", "cosine", "step", "triangular", "constant")
WARMUP_SCHEDULES = ("onecycle", "triangular")  # the schedules engine.optimizers.lr_at warms up
PRECISIONS = ("bf16", "fp16", "fp32")  # engine.run.DTYPES gives their torch dtypes
PAD_MODES = ("reflect", "zeros")  # --translate's padding: TrainConfig.augment's reflect or not
# the largest float32: the optimizers scale float32 weights' steps by the LR and weight decay,
# and a larger value is a traceback from inside the first step ("cannot be converted to type
# float without overflow")
FLOAT32_MAX = 3.4028234663852886e38
# the widest ResNet-18 torch can make: its layer4 weights (8w x 8w x 3 x 3 float32) in bytes
# within an int64; past it the model's build was a RuntimeError traceback ("Storage size
# calculation overflowed"), where narrower widths that do not fit end as out of memory
MAX_WIDTH = math.isqrt((2**63 - 1) // (8 * 8 * 3 * 3 * 4))
# why an explicit --cudnn-benchmark is refused beside --deterministic: taken, it would be
# ignored (TrainConfig.autotunes); engine.options says it of a new run, engine.resume of a resume
AUTOTUNE_REFUSED = "--cudnn-benchmark times cuDNN's algorithms, which --deterministic rules out"
SAID_LENGTH = 80  # a damaged checkpoint's foreign value, in a message: the first characters


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

    def decay_to_blame(self) -> bool:
        """Whether a divergence is blamed on --weight-decay (1 or more), not on the LR: each
        step's decay alone scales the weights by 1 - lr x wd."""
        return self.weight_decay >= 1

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
#   baseline (github.com/KellerJordan/cifar10-zoo at d5a9ca5,
#   airbench/baselines/train_resnet18_94.py, since removed from the repository: 26 epochs at
#   batch 500, 94% with its TTA level 2, "Runs in 51 seconds on an NVIDIA A100", 2.10 s/epoch).
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

CONFIG_KEYS = {f.name for f in fields(TrainConfig)}  # what a saved config holds

# the fields that take one of a list of names, in the order engine.options offers them (a test
# keeps the two alike); foreign_values checks a saved config against them, and log_with
# against engine.trackers.tracker_names()
CHOICES: dict[str, tuple[str, ...]] = {
    "preset": tuple(sorted(PRESETS)), "dataset": DATASETS, "loader": LOADERS,
    "pad_mode": PAD_MODES, "arch": ARCHS, "optimizer": OPTIMIZERS, "schedule": SCHEDULES,
    "precision": PRECISIONS, "compile_mode": COMPILE_MODES}


def field_value(value: object) -> object:
    """An option's value, or a saved config's, as a TrainConfig field holds it: paths as
    strings, lists (JSON's tuples) as tuples."""
    return str(value) if isinstance(value, Path) else tuple(value) if isinstance(
        value, list) else value


def _fits(value: object, hint: object) -> bool:
    """Whether value has the type a TrainConfig field's annotation names (an int is a float;
    a bool, an int to Python, is neither: `"epochs": true` in an edited config is no count)."""
    if isinstance(hint, types.UnionType):
        return any(_fits(value, h) for h in typing.get_args(hint))
    if typing.get_origin(hint) is tuple:
        items = typing.get_args(hint)
        return isinstance(value, tuple) and len(value) == len(items) and all(
            _fits(v, h) for v, h in zip(value, items, strict=True))
    if isinstance(value, bool) and hint in (int, float):
        return False
    if hint is float:
        return isinstance(value, int | float)
    return value is None if hint is type(None) else isinstance(value, hint)


def foreign_values(cfg: TrainConfig) -> list[str]:
    """Fields of another type than declared, or outside the command line's choices: never
    from the command line (argparse types and checks it), so from a damaged checkpoint."""
    # here, not at the top: accelerate imports torch, and this module parses options without it
    from engine.trackers import tracker_names

    hints = typing.get_type_hints(TrainConfig)
    wrong = [f"{name} is {_said(getattr(cfg, name))}, not {hint}" for name, hint in hints.items()
             if not _fits(getattr(cfg, name), hint)]
    choices = {**CHOICES, "log_with": tracker_names()}
    return wrong or [f"{name} is {_said(getattr(cfg, name))}, not one of {', '.join(options)}"
                     for name, options in choices.items()
                     if getattr(cfg, name) not in (None, *options)]


def _said(value: object) -> str:
    """A foreign value as part of a one-line message, cut at SAID_LENGTH characters: a
    tensor's or a list's repr may run over many lines and pages."""
    text = re.sub(r"\s*\n\s*", " ", repr(value))  # a str's repr holds no line break
    return text if len(text) <= SAID_LENGTH else f"{text[:SAID_LENGTH]}..."


def too_wide(option: str, width: int) -> str | None:
    """Why a model `width` wide cannot be built, for `option`; None when it can be."""
    if width > MAX_WIDTH:
        return (f"{option} must be at most {MAX_WIDTH} (a wider model's largest weight has more "
                f"bytes than torch can count), got {width}")
    return None


def validate(cfg: TrainConfig) -> list[str]:
    """Impossible or contradictory values, as messages a user can act on."""
    problems = []
    for name in ("epochs", "batch_size", "width"):
        if getattr(cfg, name) < 1:
            problems.append(f"{option_name(name)} must be at least 1")
    if problem := too_wide("--width", cfg.width):
        problems.append(problem)
    if cfg.lr != "auto" and not (isinstance(cfg.lr, float | int) and 0 < cfg.lr <= FLOAT32_MAX):
        problems.append(f"--lr must be a positive finite number no larger than {FLOAT32_MAX:.2g} "
                        f"(the float32 weights' largest) or 'auto', got {cfg.lr}")
    if not 0 <= cfg.label_smoothing < 1:
        problems.append(f"--label-smoothing must be in [0, 1), got {cfg.label_smoothing}")
    if not 0 <= cfg.warmup < 1:
        problems.append(f"--warmup must be in [0, 1), got {cfg.warmup}")
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
