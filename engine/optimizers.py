"""Optimizers and per-batch learning-rate schedules, chosen by name from the config."""

import math
from functools import partial

import torch
from torch import nn

from engine.config import OPTIMIZERS, SCHEDULES, TrainConfig

# onecycle starts at peak/25 and ends at peak/(25 * 1e4), the torch.optim.lr_scheduler.OneCycleLR
# defaults (div_factor, final_div_factor).
ONECYCLE_START = 1 / 25
ONECYCLE_END = ONECYCLE_START / 1e4
# the step schedule multiplies the LR by STEP_GAMMA at each of these fractions of the steps
STEP_MILESTONES, STEP_GAMMA = (0.5, 0.75), 0.1


def param_groups(model: nn.Module, weight_decay: float, decay_norm_and_bias: bool) -> list[dict]:
    """Split trainable parameters into a decayed group and (second) a non-decayed one.

    With decay_norm_and_bias False, every parameter with ndim <= 1 (BatchNorm scales and shifts,
    all biases) gets weight_decay 0, the "no bias decay" of "Bag of Tricks" (He et al. 2019,
    sec. 3.1), which after Jia et al. regularizes only the weights to avoid overfitting.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if decay_norm_and_bias:
        return [{"params": params, "weight_decay": weight_decay}]
    return [
        {"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
    ]


def state_per_parameter(name: str, momentum: float) -> int:
    """Tensors the size of each parameter that optimizer `name` keeps once it has stepped (its
    share of ckpt.pt): SGD's momentum buffer, Adam's two moments, RMSprop's mean square and
    its momentum buffer."""
    if name in ("sgd", "nesterov"):
        return int(momentum > 0)
    if name in ("adam", "adamw"):
        return 2
    if name == "rmsprop":
        return 1 + int(momentum > 0)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


def fuses(name: str, device: torch.device, scaled: bool) -> bool:
    """Whether optimizer `name` steps in one fused kernel on `device`: on CUDA, but SGD's
    (sgd, nesterov) under the fp16 loss scaler (`scaled`). torch's fused SGD makes its
    momentum buffers with empty_like on the first step, and its kernel skips a step whose
    gradients the scaler found infinite: an overflowed first step leaves them uninitialized
    and every later step adds that garbage (read in torch's source, and shown on the CPU,
    whose fused kernel skips alike: tests/test_optim.py). Adam's moments start as zeros."""
    return device.type == "cuda" and not (scaled and name in ("sgd", "nesterov"))


def build_optimizer(
    name: str,
    model: nn.Module,
    lr: float,
    weight_decay: float = TrainConfig.weight_decay,
    momentum: float = TrainConfig.momentum,
    decay_norm_and_bias: bool = TrainConfig.decay_norm_bias,
    fused: bool = False,
) -> torch.optim.Optimizer:
    """Build an optimizer by name; adam adds weight decay to the gradient (L2), adamw decouples.

    momentum is SGD's and RMSprop's momentum and Adam's beta1 (beta2 stays torch's 0.999).

    fused: one kernel for all parameters' updates (sgd, nesterov, adam, adamw; rmsprop has
    none). It also lets an fp16 GradScaler skip its per-step host sync on inf checks.
    """
    groups = param_groups(model, weight_decay, decay_norm_and_bias)
    fused = fused or None  # None: torch's own default (foreach on CUDA)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, fused=fused)
    if name == "nesterov":  # with no momentum, no look-ahead: plain SGD, which torch requires
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=momentum > 0,
                               fused=fused)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, betas=(momentum, 0.999), fused=fused)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(momentum, 0.999), fused=fused)
    if name == "rmsprop":
        return torch.optim.RMSprop(groups, lr=lr, momentum=momentum)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


def _cos_interp(start: float, end: float, frac: float) -> float:
    """Half-cosine from start (frac=0) to end (frac=1): flat at both ends, steep in the middle."""
    return end + (start - end) * (1 + math.cos(math.pi * frac)) / 2


def lr_at(
    name: str,
    step: int,
    total_steps: int,
    warmup_frac: float = TrainConfig.warmup,
) -> float:
    """LR multiplier (on each group's base lr) before optimizer step `step` of `total_steps`.

    W = int(warmup_frac * total_steps) warm-up steps; steps past total_steps stay at the end value.
    - constant: 1.
    - triangular: linear (s+1)/(W+1) up to 1 at step W, then linear down to 0 at total_steps
      (the shape of Keller Jordan's ResNet-18 baseline in github.com/KellerJordan/cifar10-zoo at
      d5a9ca5, which starts at 0.2 instead). The +1 is ours: the first batch trains at 1/(W+1)
      rather than waste a step at lr 0.
    - onecycle: half-cosine from 1/25 up to 1 at step W, then half-cosine down to 1/25/1e4 at
      total_steps: the cosine one-cycle of fastai's fit_one_cycle, in step with ours (it ends
      at 1/1e5), and of torch's OneCycleLR (pct_start=warmup_frac, cos annealing), a step
      ahead: its LR at step s is ours at s + 1 from its peak (step W - 1) on, and between ours
      at s and s + 1 before (both where warmup_frac x total_steps is whole). Smith & Topin
      (2019) moved the LR linearly. The LR only: momentum stays --momentum, where OneCycleLR
      (cycle_momentum) and fit_one_cycle move it between 0.95 and 0.85 against the LR.
    - cosine: half-cosine from 1 to 0 over all steps; ignores warmup_frac (SGDR without restarts,
      Loshchilov & Hutter 2017). Use onecycle or triangular for a warm-up.
    - step: STEP_GAMMA ** (milestones passed), milestone m of STEP_MILESTONES falling at step
      int(m * total_steps).
    """
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0 <= warmup_frac < 1:
        raise ValueError(f"warmup_frac must be in [0, 1), got {warmup_frac}")
    s = min(max(step, 0), total_steps)
    warmup = int(warmup_frac * total_steps)  # < total_steps because warmup_frac < 1
    if name == "constant":
        return 1.0
    if name == "step":
        return STEP_GAMMA ** sum(s >= int(m * total_steps) for m in STEP_MILESTONES)
    if name == "cosine":
        return _cos_interp(1.0, 0.0, s / total_steps)
    if name == "triangular":
        if s < warmup:
            return (s + 1) / (warmup + 1)
        return (total_steps - s) / (total_steps - warmup)
    # onecycle
    if s < warmup:
        return _cos_interp(ONECYCLE_START, 1.0, s / warmup)
    return _cos_interp(1.0, ONECYCLE_END, (s - warmup) / (total_steps - warmup))


def build_schedule(
    name: str,
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_frac: float = TrainConfig.warmup,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-batch LambdaLR whose multiplier is lr_at (see there for the shapes); step every batch."""
    fn = partial(lr_at, name, total_steps=total_steps, warmup_frac=warmup_frac)
    fn(0)  # validate arguments here, with a clear message, before LambdaLR touches the optimizer
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


def load_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR, state: dict,
                  step: int) -> None:
    """Continue a saved schedule at `step`, with the LR this schedule gives there.

    The optimizer's saved state holds the LR of the saved schedule; on --resume with more
    --epochs the schedule is stretched, and its first step must already train at the new LR.
    `step` is this run's steps in the epochs done: the saved count is another run's when the
    number of processes (and so the steps per epoch) changed.
    """
    scheduler.load_state_dict(state)
    scheduler.last_epoch = step
    groups = scheduler.optimizer.param_groups
    for group, base, multiplier in zip(groups, scheduler.base_lrs, scheduler.lr_lambdas,
                                       strict=True):
        group["lr"] = base * multiplier(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in groups]  # what get_last_lr() reports


def load_optimizer(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a saved optimizer state, keeping how this optimizer runs (fused, foreach: chosen
    for this device by engine.run.build), which load_state_dict would take from the file.

    The flags go into the saved groups before loading, as torch places each state's step
    by them (on the device when fused): a run begun on the CPU and resumed on a GPU then
    steps fused there.
    """
    ways = ("fused", "foreach", "capturable", "differentiable")
    # strict=False: groups of another count are load_state_dict's own error, with its words
    groups = [{**saved, **{k: group[k] for k in ways if k in group}}
              for saved, group in zip(state["param_groups"], optimizer.param_groups,
                                      strict=False)]
    optimizer.load_state_dict({**state, "param_groups": groups})
    # load_state_dict takes a momentum buffer of any shape; the first step would fail on it
    for param, buffers in optimizer.state.items():
        for name, value in buffers.items():
            if name != "step" and isinstance(value, torch.Tensor) and value.shape != param.shape:
                raise ValueError(f"a saved {name} of shape {tuple(value.shape)} for a parameter "
                                 f"of shape {tuple(param.shape)}")
