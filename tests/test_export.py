"""tools/export.py: each format exported from a real trained checkpoint by a real subprocess,
then loaded back independently (onnxruntime, torch.jit.load, safetensors) and compared with the
checkpoint's model on the test .beton images."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    cpu_out_of_memory,
    cuda_out_of_memory,
    in_process,
    overwritten_copy,
    run_script,
    tmpfs,
)

from common.errors import ExportError
from engine import checkpoint
from engine.model import build_model
from loaders import beton
from tools import export as export_command
from tools import export_writers
from tools.export_model import (
    TOLERANCE,
    agreement,
    check_images,
    memory_advice,
    metadata,
    reference_logits,
    require,
)
from tools.export_writers import to_01


def export(*args) -> subprocess.CompletedProcess:
    return run_script("tools/export.py", *args, timeout=300)


@pytest.fixture(scope="module")
def held_out(ckpt) -> tuple[np.ndarray, np.ndarray]:
    """The run's whole test split (run_dir's 300 images) and the checkpoint's own logits on
    them. Not named test_*: a fixture, which a reader should not take for a test."""
    images = beton.read(Path(ckpt["data"]["test"])).images
    return images, reference_logits(ckpt, checkpoint.model_from(ckpt), images)


def run_exported(fmt: str, path: Path, images: np.ndarray) -> tuple[np.ndarray, dict]:
    """Logits and metadata of an exported file, loaded the way its users would load it."""
    if fmt == "onnx":
        import onnx
        import onnxruntime

        meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        pixels = images.transpose(0, 3, 1, 2).astype(np.float32) / 255
        return session.run(None, {"image": pixels})[0], meta
    if fmt == "torchscript":
        # the extra file's name as docs/predict-export.md gives it to users, not EXTRA_FILE
        extra = {"cifar10_engine.json": ""}
        module = torch.jit.load(str(path), _extra_files=extra)
        with torch.no_grad():
            return module(to_01(images)).numpy(), json.loads(extra["cifar10_engine.json"])
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    model = build_model(meta["arch"], int(meta["num_classes"]), int(meta["width"])).eval()
    model.load_state_dict(load_file(str(path)))
    mean = torch.tensor(json.loads(meta["mean"])).view(1, 3, 1, 1)
    std = torch.tensor(json.loads(meta["std"])).view(1, 3, 1, 1)
    with torch.no_grad():
        return model((to_01(images) - mean) / std).numpy(), meta


@pytest.fixture(scope="module")
def exported(request, run_dir, tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """tools/export.py of the shared run in the format a test names (indirect parameter), into
    a folder of its own: once per format for the whole module, an export taking seconds."""
    fmt = request.param
    out = tmp_path_factory.mktemp(f"export-{fmt}") / f"model.{fmt}"
    return export(run_dir / "ckpt.pt", "--format", fmt, "--out", out), out


@pytest.mark.slow
@pytest.mark.filterwarnings(r"ignore:.*torch\.jit.*:FutureWarning")  # loading is the point here
@pytest.mark.parametrize("exported", ["onnx", "torchscript", "safetensors"], indirect=True)
def test_export_runs_like_the_checkpoint(exported, ckpt, held_out):
    result, out = exported
    assert result.returncode == 0, result.stderr[-3000:]
    assert "top-1 differs on 0 of 256 images: OK" in result.stdout
    assert "Warning" not in result.stderr  # torch.jit's deprecation notices are hidden
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temporary left behind
    images, expected = held_out
    logits, meta = run_exported(out.suffix[1:], out, images)
    assert np.array_equal(logits.argmax(1), expected.argmax(1))
    assert np.abs(logits - expected).max() < 1e-3
    assert json.loads(meta["classes"]) == ckpt["classes"]
    assert json.loads(meta["mean"]) == ckpt["mean"] and json.loads(meta["std"]) == ckpt["std"]
    assert (meta["arch"], meta["width"], meta["num_classes"], meta["epoch"]) == (
        ckpt["arch"], str(ckpt["width"]), str(ckpt["num_classes"]), str(ckpt["epoch"]))


@pytest.mark.slow
@pytest.mark.parametrize("exported", ["onnx"], indirect=True)
def test_onnx_takes_any_batch_size(exported, held_out):
    result, out = exported
    assert result.returncode == 0, result.stderr[-3000:]
    images, expected = held_out
    for n in (1, 7):
        logits, _ = run_exported("onnx", out, images[:n])
        assert logits.shape == (n, 10) and np.allclose(logits, expected[:n], atol=1e-3)


@pytest.mark.slow
def test_missing_test_data_falls_back_to_noise_with_a_note(ckpt, tmp_path):
    moved = dict(ckpt, data=dict(ckpt["data"], test=str(tmp_path / "gone.beton")))
    torch.save(moved, tmp_path / "moved.pt")
    result = export(tmp_path / "moved.pt", "--format", "torchscript")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "gone.beton" in result.stderr and "noise" in result.stderr
    assert "uniform noise" in result.stdout and (tmp_path / "moved.torchscript.pt").is_file()


def test_recorded_test_data_overwritten_in_place_is_noted_not_checked_with(ckpt, tmp_path):
    """Nothing verified the split a checkpoint recorded (prepare() verifies the files it
    returns): its size alone was checked, and the export was checked on the damaged images."""
    test = overwritten_copy(Path(ckpt["data"]["test"]), tmp_path)
    notes = []
    _, what = check_images(dict(ckpt, data=dict(ckpt["data"], test=str(test))),
                           tmp_path / "ckpt.pt", None, notes.append)
    assert what == "uniform noise" and len(notes) == 1
    assert notes[0].startswith(f"note: no test data to check with ({test} is damaged (its "
                               "content differs from the hash its sidecar records); run `python "
                               "loaders/prepare.py --dataset synthetic ")


@pytest.mark.slow
def test_bad_inputs_are_one_message_and_leave_nothing(run_dir, tmp_path, capsys):
    """The first case by a real subprocess, the others through the command's main() in this
    process (its exit code and stderr the same; a process each took 2 seconds)."""
    (tmp_path / "junk.pt").write_text("junk")
    os.mkfifo(tmp_path / "pipe")  # a device's stand-in: renamed over, /dev/null became a file
    (tmp_path / "l1").symlink_to(tmp_path / "l2")  # links in a loop: pathlib's traceback
    (tmp_path / "l2").symlink_to(tmp_path / "l1")
    cases = (((run_dir / "ckpt.pt", "--format", "onnx", "--out", tmp_path / "l1"),
              "l1 is a symbolic link that cannot be followed ("),
             ((tmp_path / "junk.pt", "--format", "onnx"), "junk.pt"),
             ((run_dir / "ckpt.pt", "--format", "onnx", "--out", tmp_path / "pipe"),
              "pipe is a device, pipe or socket"),
             ((run_dir / "ckpt.pt", "--format", "onnx", "--data-dir", tmp_path / "nodata",
               "--out", tmp_path / "x.onnx"), "nodata"),
             ((run_dir / "ckpt.pt", "--format", "onnx", "--out", tmp_path), str(tmp_path)),
             # folders with no file name to derive the default --out from
             (("/", "--format", "safetensors"), "/ is a folder"),
             (("", "--format", "onnx", "--out", tmp_path / "x.onnx"), ". is a folder"))
    for n, (args, named) in enumerate(cases):
        result = export(*args) if n == 0 else in_process(capsys, export_command.main, *args)
        assert result.returncode == 1 and named in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.pt", "l1", "l2", "pipe"]
    assert stat.S_ISFIFO((tmp_path / "pipe").stat().st_mode)


@pytest.mark.slow
@pytest.mark.filterwarnings(r"ignore:.*torch\.jit.*:FutureWarning")  # loading is the point here
@pytest.mark.parametrize("fmt, suffix", [("torchscript", ".torchscript.pt"),
                                         ("safetensors", ".safetensors"), ("onnx", ".onnx")])
def test_a_checkpoint_in_a_folder_named_in_no_utf8_is_exported(run_dir, tmp_path, fmt, suffix):
    """torch.jit.load takes a file name only in UTF-8 (a traceback): it reads the bytes. ONNX
    and safetensors metadata take UTF-8 text only: the path's other bytes are written \\xNN
    (a UnicodeEncodeError traceback)."""
    folder = tmp_path / os.fsdecode(b"run-\xff\xfe")
    folder.mkdir()
    shutil.copy(run_dir / "ckpt.pt", folder / "ckpt.pt")
    result = run_script("tools/export.py", folder / "ckpt.pt", "--format", fmt,
                        env={**os.environ, "PYTHONIOENCODING": "utf-8:strict"},
                        errors="surrogateescape", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.endswith(f"wrote {folder}/ckpt{suffix}\n")
    plain = shutil.copy(folder / f"ckpt{suffix}", tmp_path / f"plain{suffix}")  # for the readers
    _, meta = run_exported(fmt, plain, np.zeros((1, 32, 32, 3), np.uint8))
    assert meta["checkpoint"] == f"{tmp_path}/run-\\xff\\xfe/ckpt.pt"


@pytest.mark.slow
def test_an_out_that_is_a_checkpoint_is_refused(run_dir, tmp_path, capsys):
    """--out naming the checkpoint exported (here through a symlink) or another checkpoint
    (best.pt) would replace a file the run resumes from: refused, and nothing is touched.
    The first case by a real subprocess, the others through the command's main()."""
    for name in ("ckpt.pt", "best.pt"):
        shutil.copy(run_dir / name, tmp_path / name)
    (tmp_path / "link.pt").symlink_to(tmp_path / "ckpt.pt")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    for out, what in (("ckpt.pt", "is the checkpoint being exported"),
                      ("link.pt", "is the checkpoint being exported"),
                      ("best.pt", "is a cifar10-engine checkpoint")):
        args = [str(tmp_path / "ckpt.pt"), "--format", "safetensors", "--out", str(tmp_path / out)]
        result = (export(*args) if out == "ckpt.pt" else
                  in_process(capsys, export_command.main, *args))
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        assert result.stderr.startswith(f"error: --out {tmp_path / out} {what}")
        assert "another --out" in result.stderr and len(result.stderr.splitlines()) == 1
        assert result.stdout == ""  # refused before any check ran
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


@pytest.mark.slow
def test_an_out_that_is_a_link_is_written_through(run_dir, tmp_path, capsys):
    """As cp writes: the export's rename made the link itself a plain file. A link that leads
    nowhere is refused, as cp and train refuse one (through the command's main(), in this
    process; the export by a real subprocess)."""
    (tmp_path / "real.safetensors").write_bytes(b"an older export")
    (tmp_path / "link.safetensors").symlink_to("real.safetensors")
    result = export(run_dir / "ckpt.pt", "--format", "safetensors", "--out",
                    tmp_path / "link.safetensors")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "link.safetensors").is_symlink()
    assert (tmp_path / "real.safetensors").read_bytes() != b"an older export"
    (tmp_path / "dead.safetensors").symlink_to("gone/x.safetensors")
    code = export_command.main([str(run_dir / "ckpt.pt"), "--format", "safetensors", "--out",
                                str(tmp_path / "dead.safetensors")])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith(
        f"error: --out {tmp_path / 'dead.safetensors'} is a symbolic link that cannot be "
        "followed"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "dead.safetensors", "link.safetensors", "real.safetensors"]


def test_help_states_the_tolerance_the_check_holds_to(capsys):
    """--help gives the tolerance as a number (it named the constant TOLERANCE)."""
    with pytest.raises(SystemExit):
        export_command.main(["--help"])
    stated = re.search(r"logits within (\S+) x max\(1, the largest\s+\|logit\|\)",
                       capsys.readouterr().out)
    assert stated and float(stated[1]) == TOLERANCE


def test_an_export_that_disagrees_with_the_checkpoint_is_refused_and_leaves_the_older(
        run_dir, tmp_path, monkeypatch, capsys):
    """The check is what stands between a wrong file and the user: a real safetensors file of
    other weights (one class's bias raised, as a faulty writer might leave it), loaded back
    and run as any export is, is refused in one line naming the logit gap, and the earlier
    file at --out is left as it was, with no temporary beside it. Through main()."""
    write = export_writers.WRITERS["safetensors"]

    def other_weights(model: torch.nn.Module, meta: dict[str, str], path: Path) -> None:
        changed = copy.deepcopy(model)
        with torch.no_grad():
            changed.fc.bias[0] += 1
        write(changed, meta, path)

    monkeypatch.setitem(export_writers.WRITERS, "safetensors", other_weights)
    out = tmp_path / "m.safetensors"
    out.write_bytes(b"an older export")
    code = export_command.main([str(run_dir / "ckpt.pt"), "--format", "safetensors", "--out",
                                str(out)])
    stdout, err = capsys.readouterr()
    assert code == 1 and stdout == "", err
    assert err.startswith("error: the safetensors export does not match the checkpoint's "
                          "model: max |logit difference| 1.00e+00 (limit "), err
    assert err.endswith(f"; nothing was written to {out}.\n") and len(err.splitlines()) == 1
    assert [p.name for p in tmp_path.iterdir()] == [out.name]
    assert out.read_bytes() == b"an older export"


@pytest.mark.slow
def test_broken_weights_are_refused(ckpt, tmp_path):
    weights = dict(ckpt["state_dict"])
    weights["fc.weight"] = torch.full_like(weights["fc.weight"], float("nan"))
    torch.save(dict(ckpt, state_dict=weights), tmp_path / "nan.pt")
    result = export(tmp_path / "nan.pt", "--format", "safetensors")
    assert result.returncode == 1 and "NaN" in result.stderr and "best.pt" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan.pt"]


def test_check_refuses_different_logits_and_flipped_classes():
    ref = np.random.default_rng(0).normal(size=(64, 10)).astype(np.float32)
    assert "top-1 differs on 0 of 64" in agreement(ref, ref + 1e-6, "onnx", Path("m.onnx"))
    with pytest.raises(ExportError, match="m.onnx"):
        agreement(ref, ref + 1e-2, "onnx", Path("m.onnx"))
    with pytest.raises(ExportError, match="top-1 differs"):
        agreement(ref, ref[:, ::-1].copy(), "onnx", Path("m.onnx"))
    with pytest.raises(ExportError, match="shape"):
        agreement(ref, ref[:, :5], "onnx", Path("m.onnx"))


def test_check_refuses_nan_logits_even_where_they_flip_no_class():
    """A NaN beside finite logits makes every difference NaN (never over the limit) and, at
    the top class, argmax still agrees: only the finiteness check refuses the export."""
    ref = np.random.default_rng(0).normal(size=(64, 10)).astype(np.float32)
    got = ref.copy()
    got[np.arange(64), ref.argmax(1)] = np.nan
    with pytest.raises(ExportError, match="does not match"):
        agreement(ref, got, "onnx", Path("m.onnx"))


def test_check_accepts_a_top_class_flipped_between_near_equal_logits():
    """Where the checkpoint's top two logits are within rounding of each other, an export
    that rounds them the other way is as right: refusing it would refuse good exports."""
    ref = np.random.default_rng(0).normal(size=(64, 10)).astype(np.float32)
    ref[0, :2] = [5.0, 5.0 + 1e-5]  # a near tie, class 1 ahead
    got = ref.copy()
    got[0, :2] = [5.0 + 1e-5, 5.0]  # class 0 ahead, within the tolerance
    assert "top-1 differs on 0 of 64" in agreement(ref, got, "onnx", Path("m.onnx"))


def test_missing_extra_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if it were not installed
    with pytest.raises(ExportError, match=r"pip install -e '\.\[export\]'.*onnxruntime"):
        require("onnx")
    require("torchscript")  # needs nothing beyond torch


@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "safetensors"])
def test_a_full_disk_is_one_message_naming_the_file_and_leaves_nothing(run_dir, tmp_path, fmt):
    """torch.jit.save would abort the process there, safetensors raise its own error type.
    Nothing is left: not the folder made for --out either (x here)."""
    with tmpfs(tmp_path / "full", "size=64k") as full:  # every export takes over 400 KiB
        out = full / "x" / f"m.{fmt}"
        result = export(run_dir / "ckpt.pt", "--format", fmt, "--out", out)
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        assert result.stderr.strip().endswith(f"the disk is full writing {out}; free some space "
                                              "or write to another disk.")
        assert list(full.iterdir()) == []


def test_a_read_only_out_is_named_not_its_temporary(run_dir, tmp_path):
    with tmpfs(tmp_path / "ro", "ro,size=64k") as read_only:
        out = read_only / "m.pt"
        result = export(run_dir / "ckpt.pt", "--format", "torchscript", "--out", out)
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        assert result.stderr.startswith(f"error: cannot use {out}: Read-only file system.")


def test_a_name_too_long_for_its_temporary_is_named_before_the_export(run_dir, tmp_path,
                                                                      capsys):
    """A 250-byte name fits the file system, its temporary (`.<name>.<pid>.tmp`, 257 bytes or
    more whatever the pid) does not: it was 'cannot use ...: File name too long. Check that the
    path exists, is writable ...'. (245 bytes passed or failed with the pid's digits.)
    Through the command's main() in this process (the read-only --out above is a real
    subprocess's refusal)."""
    out = tmp_path / "new" / ("m" * 247 + ".pt")
    result = in_process(capsys, export_command.main, run_dir / "ckpt.pt", "--format",
                        "torchscript", "--out", out)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith(f"error: --out {out}: its name is too long (250 bytes; "
                                    "this file system takes 255, less ")
    assert result.stderr.endswith(" for the temporary it is written as first); choose a "
                                  "shorter name.\n")
    assert list(tmp_path.iterdir()) == []  # nor the folder it would have made


def test_running_out_of_memory_is_one_line(tmp_path):
    """Out of memory was a traceback (torch's errors are no EngineError): CUDA's, and a real
    failed allocation of the CPU allocator; the export has no option that needs less."""
    for fail in (cpu_out_of_memory, cuda_out_of_memory):
        with pytest.raises(ExportError) as refused, memory_advice(tmp_path / "ckpt.pt"):
            fail()
        assert str(refused.value) == (f"out of memory exporting {tmp_path / 'ckpt.pt'}; nothing "
                                      "was written. Close other programs to free memory, or "
                                      "export on a machine with more.")


def test_the_check_tolerance_grows_with_the_largest_logit():
    """fp32 rounding grows with the logits' size: on logits near 100 a difference of 5e-3 is
    rounding (5e-5 of the largest), accepted; 2e-2 is not."""
    ref = 100 * np.random.default_rng(0).normal(size=(64, 10)).astype(np.float32)
    assert "top-1 differs on 0 of 64" in agreement(ref, ref + 5e-3, "onnx", Path("m.onnx"))
    with pytest.raises(ExportError, match="does not match"):
        agreement(ref, ref + 0.2, "onnx", Path("m.onnx"))


def test_a_top_class_flipped_within_twice_the_tolerance_is_accepted():
    """Each logit may move by the tolerance, so two that are up to twice it apart may swap:
    an export within the tolerance on every logit is accepted, whichever class it then puts
    on top (a flip past twice the tolerance moves some logit past it, refused as such)."""
    ref = np.random.default_rng(0).normal(size=(64, 10)).astype(np.float32)
    ref[0, :2] = [10.0, 10.0015]  # the largest |logit|: the limit is 1e-4 of it, just over 1e-3
    got = ref.copy()
    got[0, :2] = [10.0008, 10.0007]  # each moved by 8e-4, within the limit: class 0 on top
    assert "top-1 differs on 0 of 64" in agreement(ref, got, "onnx", Path("m.onnx"))


def test_the_metadata_gives_each_formats_own_input_contract(ckpt, tmp_path):
    """ONNX and TorchScript hold the normalization in the graph and take 0..1 pixels;
    safetensors holds the bare network, which takes them normalized: a user following the
    0..1 contract for safetensors would get wrong classes without an error."""
    for fmt in ("onnx", "torchscript"):
        assert "0..1" in metadata(ckpt, fmt, tmp_path / "ckpt.pt")["input"]
    assert metadata(ckpt, "safetensors", tmp_path / "ckpt.pt")["input"] == (
        "float32 N x 3 x 32 x 32 RGB, (pixels / 255 - mean) / std")


@pytest.mark.parametrize("package", ["onnx", "onnxruntime", "onnxscript"])
def test_each_package_the_onnx_export_needs_is_named_before_it_starts(monkeypatch, package):
    """torch.onnx.export's dynamo exporter imports onnxscript: without it the export failed
    with torch's own ImportError traceback, after the checkpoint was read and checked."""
    monkeypatch.setitem(sys.modules, package, None)  # as if it were not installed
    with pytest.raises(ExportError) as refused:
        require("onnx")
    named = str(refused.value).removeprefix("--format onnx needs ").split(", which is not")[0]
    assert package in named.split(", "), str(refused.value)  # onnxscript imports onnx, too


def test_the_command_turns_running_out_of_memory_into_its_one_line(run_dir, tmp_path,
                                                                    monkeypatch, capsys):
    """tools/export.py's own run under memory_advice: a real failed allocation of the CPU
    allocator as the model is traced is the advice, exit 1 and nothing written, not a
    traceback (the test above checks the advice, this that the command uses it)."""
    monkeypatch.setattr(torch.jit, "trace", lambda *args, **kwargs: cpu_out_of_memory())
    out = tmp_path / "m.torchscript.pt"
    code = export_command.main([str(run_dir / "ckpt.pt"), "--format", "torchscript",
                                "--out", str(out)])
    assert (code, capsys.readouterr().err) == (
        1, f"error: out of memory exporting {run_dir / 'ckpt.pt'}; nothing was written. Close "
           "other programs to free memory, or export on a machine with more.\n")
    assert list(tmp_path.iterdir()) == []
