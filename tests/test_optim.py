"""Optimizer construction, weight-decay grouping and LR schedule shapes."""

import io
import math

import pytest
import torch
from torch import nn

from engine.config import OPTIMIZERS, SCHEDULES
from engine.optimizers import (
    ONECYCLE_END,
    ONECYCLE_START,
    build_optimizer,
    build_schedule,
    fuses,
    load_optimizer,
    load_schedule,
    lr_at,
    param_groups,
    state_per_parameter,
)

T = 100  # total steps; with the default warmup_frac 0.2 warm-up ends at step 20
W = 20


class Tiny(nn.Module):
    """Conv (no bias) + BN + Linear (bias): every kind of parameter the grouping cares about."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(self.conv(x)).mean((2, 3)))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_optimizer_steps(name: str):
    torch.manual_seed(0)
    model = Tiny()
    opt = build_optimizer(name, model, lr=0.01)
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(4, 3, 8, 8)).square().mean().backward()
    opt.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_the_state_counted_for_the_checkpoint_is_what_the_optimizer_keeps(name, momentum):
    """checkpoint.check_space counts the optimizer's state before it exists (before the first
    step): the count per parameter must be what torch keeps once it has stepped."""
    model = Tiny()
    opt = build_optimizer(name, model, lr=0.01, momentum=momentum)
    model(torch.randn(4, 3, 8, 8)).square().mean().backward()
    opt.step()
    kept = sum(v.numel() for state in opt.state.values() for v in state.values()
               if torch.is_tensor(v) and v.ndim)  # not Adam's step count, a 0-d tensor
    assert kept == state_per_parameter(name, momentum) * sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_no_momentum_is_a_choice_every_optimizer_takes(name: str):
    """--momentum 0 reaches every optimizer as 0 (SGD's and RMSprop's momentum, Adam's beta1):
    none may put a default of its own in its place, as a `momentum or 0.9` would."""
    opt = build_optimizer(name, Tiny(), lr=0.01, momentum=0.0)
    for group in opt.param_groups:
        assert (group["betas"][0] if name in ("adam", "adamw") else group["momentum"]) == 0


def test_nesterov_with_no_momentum_steps_as_plain_sgd():
    """--optimizer nesterov --momentum 0: the look-ahead then looks nowhere, so it steps as plain
    SGD does (torch refuses nesterov without momentum: it was a traceback after the data was
    prepared)."""
    steps = []
    for optimizer in ("nesterov", "sgd"):
        torch.manual_seed(0)  # the same model and batches for both
        model = Tiny()
        opt = build_optimizer(optimizer, model, lr=0.01, momentum=0.0)
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(4, 3, 8, 8)).square().mean().backward()
            opt.step()
        steps.append([p.detach() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*steps, strict=True))


def test_no_decay_group_is_bn_and_biases():
    model = Tiny()
    decay, no_decay = param_groups(model, 5e-4, decay_norm_and_bias=False)
    assert {id(p) for p in decay["params"]} == {id(model.conv.weight), id(model.fc.weight)}
    expected = {id(model.bn.weight), id(model.bn.bias), id(model.fc.bias)}
    assert {id(p) for p in no_decay["params"]} == expected
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (5e-4, 0.0)

    (group,) = param_groups(model, 5e-4, decay_norm_and_bias=True)
    assert len(group["params"]) == 5 and group["weight_decay"] == 5e-4

    opt = build_optimizer("sgd", model, lr=0.1, weight_decay=1e-3)
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-3, 0.0]


def test_constant():
    assert all(lr_at("constant", s, T) == 1.0 for s in range(T + 1))


def test_triangular():
    lrs = [lr_at("triangular", s, T) for s in range(T + 1)]
    assert lrs[0] == pytest.approx(1 / (W + 1))
    assert lrs[W] == 1.0 and max(lrs) == 1.0
    assert lrs[T] == 0.0
    assert lrs[: W + 1] == sorted(lrs[: W + 1])
    assert lrs[W:] == sorted(lrs[W:], reverse=True)
    assert lr_at("triangular", 0, T, warmup_frac=0.0) == 1.0


def test_onecycle():
    assert lr_at("onecycle", 0, T) == pytest.approx(ONECYCLE_START) == pytest.approx(1 / 25)
    assert lr_at("onecycle", W, T) == 1.0
    assert lr_at("onecycle", T, T) == pytest.approx(ONECYCLE_END) == pytest.approx(4e-6)
    assert max(lr_at("onecycle", s, T) for s in range(T + 1)) == 1.0


def test_cosine_ignores_warmup():
    assert lr_at("cosine", 0, T) == 1.0
    assert lr_at("cosine", T // 2, T) == pytest.approx(0.5)
    assert lr_at("cosine", T, T) == pytest.approx(0.0)
    assert lr_at("cosine", 10, T, warmup_frac=0.5) == lr_at("cosine", 10, T, warmup_frac=0.0)


def test_step_drops_by_gamma_at_milestones():
    def at(s: int) -> float:
        return lr_at("step", s, T)  # milestones 0.5 and 0.75, gamma 0.1

    assert at(0) == at(49) == 1.0
    assert at(50) == at(74) == pytest.approx(0.1)
    assert at(75) == at(T) == pytest.approx(0.01)


@pytest.mark.parametrize("name", SCHEDULES)
def test_build_schedule_follows_lr_at(name: str):
    """Step by step the optimizer's LR is lr_at's, with the warm-up asked for (--warmup 0.5,
    not the default 0.2: a schedule dropping it would warm up for 2 steps, not 5)."""
    model = nn.Linear(2, 1)
    opt = build_optimizer("sgd", model, lr=0.5)
    sched = build_schedule(name, opt, total_steps=10, warmup_frac=0.5)
    for s in range(10):
        assert opt.param_groups[0]["lr"] == pytest.approx(0.5 * lr_at(name, s, 10, 0.5))
        opt.step()
        sched.step()
    # The state must survive torch.save/torch.load(weights_only=True) for --resume.
    buf = io.BytesIO()
    torch.save(sched.state_dict(), buf)
    buf.seek(0)
    assert torch.load(buf, weights_only=True)["last_epoch"] == 10


@pytest.mark.parametrize("saved_total, saved_steps, total, step", [(10, 10, 20, 10),
                                                                   (10, 5, 20, 10)],
                         ids=["more epochs", "fewer processes"])
def test_a_stretched_schedule_resumes_at_its_own_lr(saved_total, saved_steps, total, step):
    """--resume --epochs 2N: the saved optimizer holds the short schedule's last LR (0 for
    triangular); the first resumed step trains at what the stretched schedule gives there.
    Saved by 2 processes (5 steps an epoch) and resumed by 1 (10 an epoch), the saved count
    (5) is not this run's (10): the schedule goes on from this run's step, not the file's."""
    model = nn.Linear(2, 1)
    opt = build_optimizer("sgd", model, lr=0.5)
    sched = build_schedule("triangular", opt, total_steps=saved_total)
    for _ in range(saved_steps):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(
        0.5 * lr_at("triangular", saved_steps, saved_total))
    saved_opt, saved_sched = opt.state_dict(), sched.state_dict()

    opt = build_optimizer("sgd", model, lr=0.5)
    sched = build_schedule("triangular", opt, total_steps=total)
    opt.load_state_dict(saved_opt)
    load_schedule(sched, saved_sched, step)
    assert sched.last_epoch == step
    for s in range(step, total):
        expected = 0.5 * lr_at("triangular", s, total)
        assert opt.param_groups[0]["lr"] == sched.get_last_lr()[0] == pytest.approx(expected)
        opt.step()
        sched.step()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"name": "linear"},
        {"total_steps": 0},
        {"warmup_frac": 1.0},
        {"warmup_frac": -0.1},
    ],
)
def test_bad_schedule_args(kwargs: dict):
    args = {"name": "triangular", "total_steps": T} | kwargs
    with pytest.raises(ValueError):
        lr_at(step=0, **args)
    opt = build_optimizer("sgd", nn.Linear(2, 1), lr=0.1)
    with pytest.raises(ValueError):
        build_schedule(optimizer=opt, **args)


def test_unknown_schedule_and_optimizer_names_are_listed():
    opt = build_optimizer("sgd", nn.Linear(2, 1), lr=0.1)
    with pytest.raises(ValueError, match="onecycle"):
        build_schedule("linear", opt, T)
    with pytest.raises(ValueError, match="adamw"):
        build_optimizer("lion", nn.Linear(2, 1), lr=0.1)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_fused_optimizers_step_as_the_others_do(name: str):
    """fused=True (what a CUDA run asks for) changes the kernels, not the arithmetic; rmsprop,
    which has no fused form, ignores it."""
    models = [Tiny(), Tiny()]
    models[1].load_state_dict(models[0].state_dict())
    opts = [build_optimizer(name, m, lr=0.01, fused=fused)
            for m, fused in zip(models, (False, True), strict=True)]
    assert opts[1].defaults.get("fused", False) is (name != "rmsprop")
    x = torch.randn(4, 3, 8, 8)
    for _ in range(3):
        for model, opt in zip(models, opts, strict=True):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_a_first_step_the_fp16_scaler_skips_changes_nothing(name: str):
    """An fp16 run on CUDA whose first step's gradients overflow, fused as `fuses` says (the
    CPU's fused kernels skip a step as CUDA's do): after two good steps its weights are those
    of two good steps alone. Fused SGD kept the momentum buffers it made with empty_like for
    the skipped step, and every later step added whatever they held."""

    def trained(overflow: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model, x = Tiny(), torch.randn(4, 3, 8, 8)
        optimizer = build_optimizer(name, model, lr=0.01,
                                    fused=fuses(name, torch.device("cuda"), scaled=True))
        scaler = torch.amp.GradScaler("cpu")
        for scale in [float("inf")] * overflow + [1.0, 1.0]:
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(model(x).square().mean() * scale).backward()
            scaler.step(optimizer)  # skipped where the gradients are not finite
            scaler.update()
        return [p.detach().clone() for p in model.parameters()]

    for skipped, alone in zip(trained(overflow=True), trained(overflow=False), strict=True):
        torch.testing.assert_close(skipped, alone, rtol=1e-5, atol=1e-6)
    assert fuses(name, torch.device("cuda"), scaled=False)  # bf16 and fp32 fuse every one
    assert not fuses(name, torch.device("cpu"), scaled=False)


# --- what the mutation audit found unpinned ---------------------------------------------------

EXPECTED_OPTIMIZERS = {  # name -> (class, the hyperparameters torch must be given)
    "sgd": (torch.optim.SGD, {"momentum": 0.8, "nesterov": False, "dampening": 0}),
    "nesterov": (torch.optim.SGD, {"momentum": 0.8, "nesterov": True, "dampening": 0}),
    # adam vs adamw: the exact class tells them apart (decoupled_weight_decay, the key that
    # does in torch 2.7 on, is not in the groups of the torch 2.4 to 2.6 we support)
    "adam": (torch.optim.Adam, {"betas": (0.8, 0.999), "eps": 1e-8, "amsgrad": False}),
    "adamw": (torch.optim.AdamW, {"betas": (0.8, 0.999), "eps": 1e-8, "amsgrad": False}),
    "rmsprop": (torch.optim.RMSprop, {"momentum": 0.8, "alpha": 0.99, "eps": 1e-8,
                                      "centered": False}),
}


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("decay_norm_and_bias", [False, True])
def test_each_optimizer_is_its_torch_class_with_its_hyperparameters(name, decay_norm_and_bias):
    """adam is L2 Adam and adamw decoupled AdamW (a subclass: the exact type is checked), beta2
    and RMSprop's alpha stay torch's defaults, and weight decay sits on the right groups."""
    cls, hyper = EXPECTED_OPTIMIZERS[name]
    opt = build_optimizer(name, Tiny(), lr=0.03, weight_decay=1e-3, momentum=0.8,
                          decay_norm_and_bias=decay_norm_and_bias)
    assert type(opt) is cls
    decays = [1e-3] if decay_norm_and_bias else [1e-3, 0.0]
    assert [group["weight_decay"] for group in opt.param_groups] == decays
    for group in opt.param_groups:
        assert group["lr"] == 0.03
        assert {key: group[key] for key in hyper} == hyper


def test_cosine_is_a_half_cosine_not_a_line():
    """A quarter of the way, cosine is at (1 + cos(pi/4)) / 2 ~ 0.854 (a line: 0.75)."""
    quarter = (1 + math.cos(math.pi / 4)) / 2
    assert lr_at("cosine", T // 4, T) == pytest.approx(quarter)
    assert lr_at("cosine", 3 * T // 4, T) == pytest.approx(1 - quarter)


@pytest.mark.parametrize("total, warmup_frac", [(100, 0.25), (40, 0.3)])
def test_onecycle_is_torchs_onecyclelr_a_step_later(total, warmup_frac):
    """As its docstring says: torch's OneCycleLR (cos annealing, LR only) at step s is ours at
    s + 1 from its peak on, and between ours at s and s + 1 while it rises (warm-up steps a
    whole number: 25 and 12)."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    torchs = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1.0, total_steps=total,
                                                 pct_start=warmup_frac, cycle_momentum=False)
    peak = int(warmup_frac * total) - 1
    for s in range(total):
        lr = optimizer.param_groups[0]["lr"]
        ours = lr_at("onecycle", s, total, warmup_frac), lr_at("onecycle", s + 1, total,
                                                                 warmup_frac)
        if s >= peak:
            assert lr == pytest.approx(ours[1], rel=1e-9), s
        else:
            assert ours[0] <= lr <= ours[1], s
        optimizer.step()
        torchs.step()


def test_onecycle_rises_and_falls_along_half_cosines():
    """A quarter into the warm-up (step 5 of 20) and into the decay (step 20 + 20 of 80)."""
    quarter = (1 + math.cos(math.pi / 4)) / 2
    assert lr_at("onecycle", W // 4, T) == pytest.approx(1 + (ONECYCLE_START - 1) * quarter)
    assert lr_at("onecycle", W + (T - W) // 4, T) == pytest.approx(
        ONECYCLE_END + (1 - ONECYCLE_END) * quarter)


@pytest.mark.parametrize("name", SCHEDULES)
def test_steps_outside_the_schedule_take_its_end_values(name):
    """Past total_steps (a rounding in an epoch count, an extra step) the LR stays at the last
    value, never below 0 or back up; before step 0 it is the first value."""
    for past in (T + 1, T + 5, 3 * T):
        assert lr_at(name, past, T) == lr_at(name, T, T)
    assert lr_at(name, -3, T) == lr_at(name, 0, T)


def test_warmup_steps_are_rounded_down():
    """W = int(0.27 * 10) = 2 (round would give 3): 1/3 at step 0, the peak at step 2, then
    linear down over 8 steps."""
    assert lr_at("triangular", 0, 10, warmup_frac=0.27) == pytest.approx(1 / 3)
    assert lr_at("triangular", 1, 10, warmup_frac=0.27) == pytest.approx(2 / 3)
    assert lr_at("triangular", 2, 10, warmup_frac=0.27) == 1.0
    assert lr_at("triangular", 5, 10, warmup_frac=0.27) == pytest.approx(5 / 8)
    assert lr_at("onecycle", 2, 10, warmup_frac=0.27) == 1.0
    assert lr_at("onecycle", 1, 10, warmup_frac=0.27) == pytest.approx(
        ONECYCLE_START + (1 - ONECYCLE_START) / 2)


@pytest.mark.parametrize("total, warmup_frac", [(T, 0.0), (10, 0.05)])
def test_onecycle_without_warmup_steps_starts_at_its_peak(total, warmup_frac):
    """--warmup 0, or a fraction of so few steps that W = int(0.05 * 10) = 0: no warm-up to
    divide by, the first step trains at the peak and the LR falls from there."""
    assert lr_at("onecycle", 0, total, warmup_frac) == 1.0
    assert lr_at("onecycle", total, total, warmup_frac) == pytest.approx(ONECYCLE_END)
    lrs = [lr_at("onecycle", s, total, warmup_frac) for s in range(total + 1)]
    assert lrs == sorted(lrs, reverse=True)


@pytest.mark.parametrize("saved_fused, fused", [(False, True), (True, False)])
def test_a_loaded_state_keeps_the_way_this_optimizer_steps(saved_fused, fused):
    """A checkpoint of a run on one device resumed on another: the moments and step come from
    the file, fused or not from this optimizer (torch's load_state_dict would take the file's,
    and place the step by it)."""
    torch.manual_seed(0)
    saved_model, model = Tiny(), Tiny()
    saved = build_optimizer("adam", saved_model, 1e-2, 5e-4, 0.9, fused=saved_fused)
    saved_model(torch.randn(4, 3, 8, 8)).sum().backward()
    saved.step()
    state = torch.load(io.BytesIO(_saved(saved.state_dict())), weights_only=True)
    optimizer = build_optimizer("adam", model, 1e-2, 5e-4, 0.9, fused=fused)
    load_optimizer(optimizer, state)
    assert [g["fused"] for g in optimizer.param_groups] == [fused or None] * 2
    params = [p for group in optimizer.param_groups for p in group["params"]]  # state's order
    for i, p in enumerate(params):
        got, want = optimizer.state[p], saved.state_dict()["state"][i]
        torch.testing.assert_close(got["exp_avg"], want["exp_avg"])
        assert got["step"].item() == 1 and got["step"].dtype == torch.float32
    model(torch.randn(4, 3, 8, 8)).sum().backward()
    optimizer.step()  # the fused kernel takes the loaded state as it is
    assert all(optimizer.state[p]["step"].item() == 2 for p in params)


@pytest.mark.parametrize("name, buffer", [("sgd", "momentum_buffer"), ("adam", "exp_avg_sq"),
                                          ("rmsprop", "square_avg")])
def test_a_saved_state_of_another_shape_is_refused_on_load(name, buffer):
    """torch's load_state_dict takes any buffer of a parameter's state, whatever its shape; the
    first step would then fail in a traceback. Every buffer is checked, not only SGD's."""
    model = Tiny()
    saved = build_optimizer(name, model, lr=0.01)
    model(torch.randn(4, 3, 8, 8)).sum().backward()
    saved.step()
    state = saved.state_dict()
    state["state"][0][buffer] = torch.zeros(3)
    with pytest.raises(ValueError, match=rf"a saved {buffer} of shape \(3,\) for a parameter of "
                                         r"shape \(4, 3, 3, 3\)"):
        load_optimizer(build_optimizer(name, Tiny(), lr=0.01), state)


def _saved(state: dict) -> bytes:
    """state as torch.save writes it into a checkpoint."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()
