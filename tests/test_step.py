"""engine.run.train_step on a real run: what reaches the compiled model, and how."""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Callable
from contextlib import closing
from functools import partial
from pathlib import Path

import pytest
import torch
import torch._inductor.config
import torch.nn.functional as F
from conftest import SYNTHETIC_SIZE, small_run
from torch._dynamo.utils import counters

from common import progress
from common.hardware import launched_processes, native_bf16
from engine.config import TrainConfig, resolve, validate
from engine.launch import make_accelerator
from engine.loop import summary_line, train_epoch
from engine.loop import test_epoch as evaluate_epoch  # not collected as a test by its name
from engine.optimizers import lr_at
from engine.options import parse
from engine.resume import resume_config
from engine.run import build, endless, train_step


def test_a_smaller_last_batch_runs_eager_and_compiles_no_second_graph(prepared, tmp_path):
    run = small_run(prepared, tmp_path)
    graphs = []

    def count_graphs(graph: torch.fx.GraphModule, example_inputs) -> Callable:
        graphs.append(graph)  # dynamo hands each new graph to its backend once
        return graph.forward

    # build's compilation, with a backend that records graphs instead of making kernels
    run.step_model = torch.compile(run.model, backend=count_graphs, dynamic=False)
    batches = list(run.train_loader)
    assert len(batches[-1][1]) < run.cfg.batch_size  # 605 images: a last batch of 29
    for images, labels in batches:
        loss, correct = train_step(run, images, labels)
        assert torch.isfinite(loss)
    assert len(graphs) == 1


def test_a_batch_size_above_the_split_still_runs_the_compiled_model(prepared, tmp_path):
    """The loader caps the batch at the split (605 images here): every batch is then full, so
    each step runs the compiled graph. Compared with the option, they all ran eagerly."""
    run = small_run(prepared, tmp_path, batch_size=4096)
    sizes, compiled = [], run.step_model
    run.step_model = lambda images: sizes.append(len(images)) or compiled(images)
    for images, labels in run.train_loader:
        train_step(run, images, labels)
    assert sizes == [SYNTHETIC_SIZE[0]]


@pytest.mark.parametrize("mode", ["default", "reduce-overhead", "max-autotune",
                                  "max-autotune-no-cudagraphs"])
def test_each_compile_mode_the_docs_name_is_taken_and_is_one_of_torch_compiles(mode):
    """docs/training.md offers torch.compile's four modes: each is taken by --compile-mode
    (a mode left out of COMPILE_MODES was refused as no choice), and each is one torch.compile
    knows, so the choices name no mode inductor would refuse."""
    from torch._inductor import list_mode_options

    assert parse(["--compile-mode", mode]).cfg.compile_mode == mode
    assert mode in list_mode_options()


def test_a_compile_mode_compiles_and_may_change_on_resume():
    """--compile-mode asks for torch.compile (also where it is off by default, the CPU) and,
    like --compile, may change when a run is resumed."""
    options = parse(["--compile-mode", "reduce-overhead"])
    assert options.given == {"compile_mode": "reduce-overhead", "compile": True}
    assert resolve(options.cfg, cuda=False).compile is True
    assert resolve(parse([]).cfg, cuda=False).compile is False  # the CPU's default stays
    saved = resolve(parse(["--dataset", "synthetic"]).cfg, cuda=True).to_dict()
    cfg = resume_config(saved, options.given, Path("runs/x"))
    assert (cfg.compile, cfg.compile_mode) == (True, "reduce-overhead")
    # and --no-compile on a run of a mode: refused as a contradiction, which it was not
    again = resume_config(cfg.to_dict(), parse(["--no-compile"]).given, Path("runs/x"))
    assert (again.compile, again.compile_mode, validate(again)) == (False, "default", [])


@pytest.mark.parametrize("argv, cuda, bf16, want", [
    ([], True, True, "bf16"),  # Ampere and up
    ([], True, False, "fp16"),  # a T4 or a V100: no bf16 tensor cores, no bf16 compilation
    ([], False, False, "fp32"),  # the CPU
    (["--precision", "bf16"], True, False, "bf16"),  # asked for: as asked
])
def test_the_default_precision_follows_the_gpus_bf16(argv, cuda, bf16, want):
    assert resolve(parse(argv).cfg, cuda=cuda, processes=1, bf16=bf16).precision == want
    assert not native_bf16()  # no GPU here


@pytest.mark.parametrize("argv, cuda, processes, want", [
    ([], True, 1, (True, "reduce-overhead")),  # one GPU's default: compiled, on CUDA graphs
    ([], True, 2, (True, "default")),  # DDP: BatchNorm's buffers would make them skip
    (["--compile-mode", "reduce-overhead"], True, 2, (True, "reduce-overhead")),  # if asked
    ([], False, 1, (False, "default")),  # the CPU compiles only when asked
    (["--compile"], False, 1, (True, "default")),  # and then in the default mode
    (["--compile-mode", "default"], True, 1, (True, "default")),  # the mode before CUDA graphs
    (["--no-compile"], True, 1, (False, "default")),
])
def test_one_gpu_compiles_on_cuda_graphs_unless_told_otherwise(argv, cuda, processes, want):
    """The first H200 profile left the default mode's GPU idle for most of each step: a
    one-process CUDA run's default is now reduce-overhead; config.json records the mode."""
    cfg = resolve(parse(argv).cfg, cuda=cuda, processes=processes)
    assert (cfg.compile, cfg.compile_mode) == want and validate(cfg) == []


def test_a_launched_runs_processes_come_from_its_world_size(monkeypatch):
    """torchrun and accelerate launch set WORLD_SIZE in every process they start."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert launched_processes() == 1
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert launched_processes() == 8
    assert resolve(TrainConfig(), cuda=True).compile_mode == "default"  # DDP's, not CUDA graphs


def fake_topology(root: Path, cores: int, threads_per_core: int) -> Path:
    """A /sys/devices/system/cpu of `cores` cores with `threads_per_core` hyper-threads each,
    numbered as Linux numbers them (a core's second threads after all the first ones)."""
    logical = cores * threads_per_core
    for cpu in range(logical):
        siblings = ",".join(str(cpu % cores + cores * t) for t in range(threads_per_core))
        (root / f"cpu{cpu}/topology").mkdir(parents=True)
        (root / f"cpu{cpu}/topology/thread_siblings_list").write_text(siblings + "\n")
    return root


@pytest.mark.parametrize("env, threads", [
    ({"OMP_NUM_THREADS": "1"}, 3),  # plain python: torch's own count, untouched
    ({"ACCELERATE_DYNAMO_BACKEND": "NO", "OMP_NUM_THREADS": "1"}, 8),
    ({"TORCHELASTIC_RUN_ID": "r", "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2",
      "LOCAL_WORLD_SIZE": "2"}, 4),
    ({"TORCHELASTIC_RUN_ID": "r", "OMP_NUM_THREADS": "1", "WORLD_SIZE": "4",
      "LOCAL_WORLD_SIZE": "2"}, 4),  # two machines: this one's cores, 2 ways
    ({"ACCELERATE_DYNAMO_BACKEND": "NO", "OMP_NUM_THREADS": "16"}, 8),  # --cpu's host guess
    ({"TORCHELASTIC_RUN_ID": "r", "OMP_NUM_THREADS": "3"}, 3),  # fewer, by hand: kept
    ({"TORCHELASTIC_RUN_ID": "r", "OMP_NUM_THREADS": "1", "WORLD_SIZE": "16",
      "LOCAL_WORLD_SIZE": "16"}, 1),  # more processes than cores: one thread each, not none
], ids=["python", "accelerate", "torchrun x2", "two machines", "accelerate --cpu", "by hand",
        "more processes than cores"])
@pytest.mark.parametrize("threads_per_core", [1, 2], ids=["cores", "hyper-threads"])
def test_a_launched_cpu_process_takes_its_share_of_the_cores(monkeypatch, tmp_path, env, threads,
                                                             threads_per_core):
    """A launcher's OMP_NUM_THREADS=1 left a one-process CPU run on one of 8 cores; accelerate
    --cpu's count of the host's cores ignored the 8 this process may use. Hyper-threads count
    once: 8 cores of 2 threads each give what 8 cores do, as torch's own default does."""
    import common.hardware
    from common.hardware import LAUNCHED
    from engine.launch import share_cores

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8 * threads_per_core)))
    monkeypatch.setattr(common.hardware, "CPU_TOPOLOGY",
                        fake_topology(tmp_path, 8, threads_per_core))
    for name in (*LAUNCHED, "OMP_NUM_THREADS", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        share_cores()
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("env, said", [
    ({"ACCELERATE_MIXED_PRECISION": "bf16"}, "--mixed_precision bf16 is not used"),
    ({"ACCELERATE_MIXED_PRECISION": "bf16", "ACCELERATE_DYNAMO_BACKEND": "INDUCTOR"},
     "--mixed_precision bf16 and --dynamo_backend INDUCTOR are not used"),
    ({"ACCELERATE_MIXED_PRECISION": "no"}, None),
    ({"ACCELERATE_DYNAMO_BACKEND": "NO"}, None)])  # as accelerate launch sets it
def test_the_notice_of_accelerates_unused_options_names_them_in_number(monkeypatch, env, said):
    """A lone --mixed_precision was said to be "are not used"."""
    from engine.launch import launcher_options_ignored
    for variable in ("ACCELERATE_MIXED_PRECISION", "ACCELERATE_DYNAMO_BACKEND"):
        monkeypatch.delenv(variable, raising=False)
    for variable, value in env.items():
        monkeypatch.setenv(variable, value)
    notice = launcher_options_ignored()
    assert (notice is None) if said is None else f"accelerate launch's {said}:" in notice


@pytest.mark.parametrize("world_size, refused", [("1", False), ("2", True)])
def test_torchrun_restarts_are_refused_only_for_several_cpu_processes(monkeypatch, world_size,
                                                                      refused):
    """One process started again finds no peer to wait for in a rendezvous: --max-restarts
    is refused for CPU runs of several processes only."""
    from engine.launch import restarts_refused

    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "3")
    monkeypatch.setenv("WORLD_SIZE", world_size)
    monkeypatch.delenv("RANK", raising=False)
    problem = restarts_refused("runs/x")
    assert (problem is not None) == refused
    if refused:
        assert problem.startswith("torchrun --max-restarts 3 would start this run's processes")


@pytest.mark.parametrize("env, said", [
    ({"LOCAL_RANK": "x", "MASTER_PORT": "7"},
     " (accelerate reads LOCAL_RANK='x' from the environment: correct or unset it)"),
    ({"LOCAL_RANK": "x", "MASTER_PORT": "x"},
     " (accelerate reads LOCAL_RANK='x', MASTER_PORT='x' from the environment: correct or unset "
     "the one it cannot read)")], ids=["one holds the value", "two hold it"])
def test_the_variable_accelerate_could_not_read_is_named_only_when_it_is_plain(monkeypatch, env,
                                                                              said):
    """accelerate's message quotes a value only: the variable holding it is named where one
    does, and every variable it reads is listed where several do (naming one would guess)."""
    from engine.launch import ACCELERATE_READS, unread_variable

    for name in [*ACCELERATE_READS, *(k for k in os.environ if k.startswith("ACCELERATE_"))]:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert unread_variable(ValueError("invalid literal for int() with base 10: 'x'")) == said


def test_physical_cores_counts_the_cores_of_the_cpus_this_process_may_use(monkeypatch,
                                                                         tmp_path):
    """Of 4 cores of 2 threads each (cpu0-7, cpu4 cpu0's sibling), a cpuset of cpu0, cpu4 and
    cpu1 holds 2 cores; where the topology cannot be read, each CPU counts as a core."""
    import common.hardware
    from common.hardware import physical_cores

    monkeypatch.setattr(common.hardware, "CPU_TOPOLOGY", fake_topology(tmp_path / "sys", 4, 2))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 4, 1})
    assert physical_cores() == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    assert physical_cores() == 4
    monkeypatch.setattr(common.hardware, "CPU_TOPOLOGY", tmp_path / "none")
    assert physical_cores() == 8


def test_deterministic_turns_torchs_deterministic_algorithms_on_for_its_run(prepared, tmp_path,
                                                                            monkeypatch):
    """--deterministic reaches torch when the run is built (cuDNN's deterministic kernels on
    CUDA; ops without one warn), with cuBLAS's workspace set as torch asks, and turns cuDNN's
    autotuning off, which could time its way to other kernels in another process; a run
    without it turns them off again and autotunes, unless --no-cudnn-benchmark, so one process
    can build each (the bench, tools/compare.py)."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    argv = ["--dataset", "synthetic", "--data-dir", str(prepared.source.parent),
            "--synthetic-size", *map(str, SYNTHETIC_SIZE), "--width", "4", "--batch-size", "64",
            "--workers", "1", "--out", str(tmp_path / "run")]
    try:
        cfg = resolve(parse([*argv, "--deterministic"]).cfg, cuda=False)  # benchmark on by default
        run = build(cfg, make_accelerator(cfg))
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert torch.backends.cudnn.benchmark is False
        loss, _ = train_step(run, *next(iter(run.train_loader)))
        assert torch.isfinite(loss)
        cfg = resolve(parse(argv).cfg, cuda=False)
        build(cfg, make_accelerator(cfg))
        assert not torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.benchmark is True
        cfg = resolve(parse([*argv, "--no-cudnn-benchmark"]).cfg, cuda=False)
        build(cfg, make_accelerator(cfg))
        assert torch.backends.cudnn.benchmark is False
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.slow
def test_the_compile_mode_reaches_inductor(prepared, tmp_path):
    """A real compile (under a minute on 2 cores): reduce-overhead asks inductor for CUDA graphs,
    which it skips on the CPU and counts as skipped; the default mode never asks for them.
    Inductor writes scalar C++ here: vectorized kernels are not what is tested, and they took
    longer to compile (CI starts without inductor's cache)."""
    run = small_run(prepared, tmp_path, compile=True, compile_mode="reduce-overhead")
    counters.clear()
    images, labels = next(iter(run.train_loader))
    with torch._inductor.config.patch({"cpp.vec_isa_ok": False}):  # compiled at the first step
        for _ in range(2):
            loss, _ = train_step(run, images, labels)
            assert torch.isfinite(loss)
    assert counters["inductor"]["cudagraph_skips"] >= 1


def test_the_loss_of_a_partial_last_batch_is_summed_over_its_own_images(prepared, tmp_path):
    """train_step returns the batch's summed loss: the mean times the images it held (29 in the
    last batch), not times the batch size, so the epoch's mean loss is right. The reference is
    the same model's label-smoothed cross entropy on that batch, taken just before the step
    (BatchNorm in train mode normalizes by the batch, so the step's forward gives the same);
    the count of correct answers is that forward's too."""
    run = small_run(prepared, tmp_path)
    assert run.cfg.label_smoothing > 0  # the reference must apply it too
    *_, (images, labels) = run.train_loader
    assert len(labels) == 29
    run.model.train()
    with torch.no_grad(), run.autocast():
        logits = run.model(images).float()
    want = F.cross_entropy(logits, labels, reduction="sum",
                           label_smoothing=run.cfg.label_smoothing)
    loss, correct = train_step(run, images, labels)
    assert loss.item() == pytest.approx(want.item(), rel=1e-4)
    assert correct.item() == (logits.argmax(1) == labels).sum().item()


def test_the_seed_picks_the_initial_weights_and_the_order_of_the_batches(prepared, tmp_path):
    """--seed reaches the model and the loaders: one seed builds the same weights and shuffles
    and augments the split alike each time, another apart."""
    def first_batch(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        run = small_run(prepared, tmp_path, seed=seed)
        run.train_loader.set_epoch(0)
        return next(run.model.parameters()), *next(iter(run.train_loader))

    (weights, images, labels), (same, again, labels_again), (other, _, other_labels) = map(
        first_batch, (1, 1, 2))
    assert torch.equal(weights, same) and not torch.equal(weights, other)
    assert torch.equal(images, again) and torch.equal(labels, labels_again)
    assert not torch.equal(labels, other_labels)


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_a_runs_batches_and_forward_pass_are_of_its_precision(prepared, tmp_path, precision,
                                                              dtype):
    """--precision bf16 runs on the CPU too: the loader hands over bf16 batches and the forward
    pass autocasts to bf16, not fp16; the step's loss is taken in fp32."""
    run = small_run(prepared, tmp_path, precision=precision)
    images, labels = next(iter(run.train_loader))
    assert images.dtype == dtype
    with run.autocast():
        assert run.model(images).dtype == dtype
    loss, correct = train_step(run, images, labels)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_the_loss_scaler_steps_as_an_unscaled_step_would(prepared, tmp_path):
    """fp16's path through train_step: the loss scaled before backward, the gradients unscaled
    before the optimizer steps, the scale updated after. fp16 needs CUDA, so a real GradScaler
    on the CPU stands in for the one build makes for it: with a power of two for its scale
    (exact in fp32) the step moves the weights as the unscaled one does, and a finite step
    grows the scale (growth_interval 1)."""
    plain, scaled = (small_run(prepared, tmp_path) for _ in range(2))
    scaled.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)
    images, labels = next(iter(plain.train_loader))
    for run in (plain, scaled):
        train_step(run, images[:8], labels[:8])
    for a, b in zip(plain.model.parameters(), scaled.model.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    assert scaled.scaler.get_scale() == 2.0**11


def test_an_epoch_trains_its_own_order_and_its_progress_lines_give_its_numbers(
        prepared, tmp_path, monkeypatch, capsys):
    """train_epoch(run, e) trains epoch e's shuffle and augmentation (a loader left at its
    first epoch trains one order every epoch), and in a log (stderr no terminal, as here) its
    progress lines give the last batch's loss per image (not summed over the batch), the
    epoch's accuracy so far and its images per second: a line after every batch here, not
    every LOG_INTERVAL seconds."""
    monkeypatch.setattr(progress, "LineProgress", partial(progress.LineProgress, interval=0.0))
    run = small_run(prepared, tmp_path, batch_size=256)  # 3 steps: 256, 256 and 93 images
    trained = []
    run.model.register_forward_pre_hook(lambda module, args: trained.append(args[0].clone()))
    row = train_epoch(run, 1, lambda: None)
    run.train_loader.set_epoch(1)
    assert all(torch.equal(images, batch) for (batch, _), images in
               zip(run.train_loader, trained, strict=True))
    lines = capsys.readouterr().err.splitlines()
    steps = len(run.train_loader)
    found = [re.fullmatch(rf"epoch 2/{run.cfg.epochs}: (\d+)/{steps} batches "
                          r"loss=(\d+\.\d{3}) acc=(\d+\.\d%) img_s=[1-9][\d,]*", line)
             for line in lines]
    assert all(found) and [int(m[1]) for m in found] == list(range(1, steps + 1)), lines
    sizes = [run.cfg.batch_size] * (steps - 1) + [SYNTHETIC_SIZE[0] % run.cfg.batch_size]
    losses = [float(m[2]) for m in found]
    mean = sum(loss * n for loss, n in zip(losses, sizes, strict=True)) / sum(sizes)
    assert mean == pytest.approx(row["train_loss"], abs=5e-4)  # the lines' rounding
    assert found[-1][3] == f"{row['train_acc']:.1%}"


@pytest.mark.parametrize("channels_last", [False, True])
def test_a_runs_model_is_given_batches_in_its_memory_format(prepared, tmp_path, channels_last):
    """--no-channels-last: both loaders hand over contiguous batches, as its model is, so that
    neither training nor evaluation copies each batch into the other layout (on a GPU, other
    kernels and a transpose per convolution); by default both are channels_last."""
    run = small_run(prepared, tmp_path, channels_last=channels_last)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    seen = []
    run.model.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    train_step(run, *next(iter(run.train_loader)))
    evaluate_epoch(run)
    assert len(seen) == 1 + (1 + run.cfg.tta) * len(run.test_loader)  # tta: 2 passes a batch
    assert all(x.is_contiguous(memory_format=layout) for x in seen)
    assert next(run.model.parameters()).dim() == 4  # a convolution first: the layout matters
    assert next(run.model.parameters()).is_contiguous(memory_format=layout)


def test_a_runs_schedule_spans_every_step_of_its_epochs(prepared, tmp_path):
    """The LR follows --schedule over epochs x steps per epoch, with --warmup's share, one
    schedule step per train_step: its peak after the warmup, its end value at the last step
    of the last epoch. Stepped by train_step itself, whose missing scheduler.step() left every
    step at the first one's LR."""
    run = small_run(prepared, tmp_path, epochs=2, batch_size=256, schedule="triangular",
                    warmup=0.4, lr=0.2)
    total = run.cfg.epochs * len(run.train_loader)  # 2 x 3: warm-up steps 0 and 1
    images, labels = next(iter(run.train_loader))
    lrs = []
    for _ in range(total + 1):
        lrs.append(run.optimizer.param_groups[0]["lr"])
        train_step(run, images[:8], labels[:8])  # any batch steps the schedule once
    assert lrs == pytest.approx([0.2 * lr_at("triangular", step, total, warmup_frac=0.4)
                                 for step in range(total + 1)])
    assert max(lrs) == pytest.approx(0.2) and lrs[-1] == 0.0


@pytest.mark.parametrize("decay_norm_bias", [False, True])
def test_a_step_takes_its_own_batchs_gradients_with_the_runs_optimizer(prepared, tmp_path,
                                                                      decay_norm_bias):
    """The optimizer train_step steps has the config's momentum and weight decay (none on
    BatchNorm and biases but with --decay-norm-bias), and a step's gradients are its own
    batch's loss's alone: left from the previous step (no zero_grad), they would add up."""
    run = small_run(prepared, tmp_path, optimizer="nesterov", momentum=0.5, weight_decay=0.01,
                    decay_norm_bias=decay_norm_bias)
    decays = [0.01] if decay_norm_bias else [0.01, 0.0]  # engine.optimizers.param_groups'
    assert [(g["weight_decay"], g["momentum"], g["nesterov"]) for g in
            run.optimizer.param_groups] == [(decay, 0.5, True) for decay in decays]
    images, labels = next(iter(run.train_loader))
    first, second = (images[:8], labels[:8]), (images[8:16], labels[8:16])
    train_step(run, *first)  # its gradients are left on the weights
    reference = copy.deepcopy(run.model)  # the weights the second step starts from
    reference.zero_grad(set_to_none=True)
    with run.autocast():
        F.cross_entropy(reference(second[0]).float(), second[1],
                        label_smoothing=run.cfg.label_smoothing).backward()
    train_step(run, *second)
    for param, want in zip(run.model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(param.grad, want.grad)


def test_endless_batches_go_on_in_each_next_epochs_order(prepared, tmp_path):
    """A range test or profile longer than an epoch goes on into epoch 2's shuffle, not epoch
    1's order again."""
    run = small_run(prepared, tmp_path)
    steps = len(run.train_loader)
    with closing(endless(run)) as batches:
        labels = [next(batches)[1] for _ in range(2 * steps)]
    first, second = torch.cat(labels[:steps]), torch.cat(labels[steps:])
    assert len(first) == SYNTHETIC_SIZE[0]
    assert torch.equal(first.sort().values, second.sort().values)  # the whole split, each
    assert not torch.equal(first, second)


def test_the_epoch_line_says_its_lr_is_the_one_after_the_epoch():
    """A decaying schedule ends at LR 0: a bare 'lr 0' on the last line read as if the whole
    epoch had not trained."""
    row = dict(epoch=24, train_loss=0.1, train_acc=0.97, test_loss=0.2, test_acc=0.94, lr=0.0,
               seconds=1.5, images_per_s=33_000.0)
    line = summary_line(row, 24)
    assert "end lr 0 " in line and line.startswith("epoch  24/24  train loss 0.1000 acc 97.00%")
