"""tools/predict.py and tools/images.py: real pictures written with PIL in many modes, a real
trained checkpoint, the command line as a real subprocess, its answers checked against the
checkpoint's model on the .beton images."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    cpu_out_of_memory,
    cuda_out_of_memory,
    in_process,
    run_code,
    run_script,
    tmpfs,
    tree,
)
from PIL import Image

from common.errors import CheckpointError, DataError, ReportError
from engine import checkpoint
from loaders import beton
from loaders.augment import Augment
from loaders.images import expand, read_image
from tools import predict as predict_command
from tools import prediction

N_CIFAR = 40  # test images saved as PNGs and predicted


def predict(*args) -> subprocess.CompletedProcess:
    return run_script("tools/predict.py", *args, timeout=300)


def write_pictures(folder: Path) -> dict[str, Path]:
    """Pictures in the modes users have, plus two files that are not pictures."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
    paths = {name: folder / name for name in
             ("rgba.png", "gray.jpg", "big.jpg", "one.png", "deep16.png", "cmyk.jpg",
              "palette.png", "text.png", "empty.png")}
    Image.fromarray(rng.integers(0, 256, (40, 50, 4), dtype=np.uint8), "RGBA").save(
        paths["rgba.png"])
    Image.fromarray(pixels[:60, :30, 0], "L").save(paths["gray.jpg"])
    Image.fromarray(pixels).save(paths["big.jpg"])
    Image.fromarray(pixels[:1, :1]).save(paths["one.png"])
    Image.fromarray(rng.integers(0, 65536, (40, 40), dtype=np.uint16)).save(paths["deep16.png"])
    Image.fromarray(pixels[:40, :40]).convert("CMYK").save(paths["cmyk.jpg"])
    Image.fromarray(pixels[:40, :40]).convert("P").save(paths["palette.png"])
    paths["text.png"].write_text("not a picture")
    paths["empty.png"].write_bytes(b"")
    return paths


# --- reading pictures (no model needed) --------------------------------------------------


def test_every_mode_becomes_32x32_rgb(tmp_path):
    paths = write_pictures(tmp_path)
    for name, path in paths.items():
        if name in ("text.png", "empty.png"):
            continue
        image = read_image(path)
        assert image.shape == (32, 32, 3) and image.dtype == np.uint8, name


def test_a_32x32_picture_is_used_unchanged(tmp_path):
    pixels = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "x.png")
    assert np.array_equal(read_image(tmp_path / "x.png"), pixels)


def test_transparency_becomes_white_and_16_bit_is_scaled(tmp_path):
    clear = np.zeros((32, 32, 4), dtype=np.uint8)  # fully transparent black
    Image.fromarray(clear, "RGBA").save(tmp_path / "clear.png")
    assert (read_image(tmp_path / "clear.png") == 255).all()
    deep = np.full((32, 32), 32896, dtype=np.uint16)  # 128 * 257: mid grey in 16 bits
    Image.fromarray(deep).save(tmp_path / "deep.png")
    assert (read_image(tmp_path / "deep.png") == 128).all()  # not clipped to 255


def test_a_dark_16_bit_picture_stays_dark(tmp_path: Path) -> None:
    """16-bit greys all below 256 are near black (200 of 65535 is 1 of 255, rounded), not 8-bit
    values: the mode's bit depth, not the picture's maximum, sets the scale."""
    Image.fromarray(np.full((32, 32), 200, dtype=np.uint16)).save(tmp_path / "dark.png")
    assert (read_image(tmp_path / "dark.png") == 1).all()


def test_a_grey_picture_with_transparency_is_read_as_it_looks(tmp_path: Path) -> None:
    """A grey PNG with an alpha channel (mode LA, as GIMP and scanners save them): its
    transparent pixels show white, as in viewers, not the black grey value stored under them."""
    grey = np.zeros((32, 32, 2), np.uint8)
    grey[:, :16, 1] = 255  # left half opaque black, right half transparent black
    Image.fromarray(grey, "LA").save(tmp_path / "grey.png")
    with Image.open(tmp_path / "grey.png") as opened:
        assert opened.mode == "LA"
    image = read_image(tmp_path / "grey.png")
    assert (image[:, :16] == 0).all() and (image[:, 16:] == 255).all()


def test_a_palettes_transparency_and_32_bit_greys_are_read_as_they_look(tmp_path):
    """A GIF-style palette picture whose transparent index is black shows white, as viewers
    show it; 32-bit integer greys beyond 255 are 16-bit values, scaled (mode I: a 16-bit PNG
    PIL opens as I, or TIFF), not clipped to white."""
    palette = Image.new("P", (32, 32), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.paste(1, (0, 0, 16, 32))  # left half red, right half the transparent black
    palette.save(tmp_path / "palette.png", transparency=0)
    with Image.open(tmp_path / "palette.png") as opened:
        assert opened.mode == "P"
    image = read_image(tmp_path / "palette.png")
    assert (image[:, :16] == (255, 0, 0)).all() and (image[:, 16:] == 255).all()
    deep = Image.fromarray(np.full((32, 32), 32896, np.int32))  # 128 * 257, mode I
    deep.save(tmp_path / "deep.tif")
    with Image.open(tmp_path / "deep.tif") as opened:
        assert opened.mode == "I"
    assert (read_image(tmp_path / "deep.tif") == 128).all()


def test_a_photo_taken_sideways_is_turned_upright(tmp_path):
    """EXIF orientation 6 (the camera held a quarter turn round): the picture is turned as
    viewers show it before it is shrunk, not classified lying on its side."""
    path = tmp_path / "photo.png"
    photo = Image.fromarray(np.random.default_rng(3).integers(0, 256, (48, 64, 3), np.uint8))
    exif = photo.getexif()
    exif[0x0112] = 6
    photo.save(path, exif=exif)
    want = photo.transpose(Image.Transpose.ROTATE_270).resize((32, 32),
                                                               Image.Resampling.LANCZOS)
    np.testing.assert_array_equal(read_image(path), np.asarray(want))


@pytest.mark.parametrize("size, filter_", [((64, 16), Image.Resampling.BICUBIC),
                                            ((16, 64), Image.Resampling.BICUBIC),
                                            ((64, 32), Image.Resampling.LANCZOS),
                                            ((32, 64), Image.Resampling.LANCZOS)],
                         ids=["wide", "tall", "wide, 32 high", "tall, 32 wide"])
def test_a_picture_is_resized_bicubic_when_a_side_grows_else_lanczos(
        tmp_path: Path, size: tuple[int, int], filter_: Image.Resampling) -> None:
    """LANCZOS only when no side grows: a picture also enlarged along one side is resized with
    BICUBIC, as one enlarged along both; one 32 pixels along a side is only shrunk: LANCZOS."""
    picture = Image.fromarray(np.random.default_rng(4).integers(0, 256, (*size[::-1], 3),
                                                                np.uint8))
    picture.save(tmp_path / "strip.png")
    want = picture.resize((32, 32), filter_)
    np.testing.assert_array_equal(read_image(tmp_path / "strip.png"), np.asarray(want))


@pytest.mark.parametrize("value, top, grey", [(0.5, 1.0, 128), (200.0, 200.0, 200),
                                               (500.0, 1000.0, 128)],
                         ids=["0..1", "0..255", "0..1000"])
def test_a_float_picture_is_scaled_not_cut(tmp_path, value, top, grey):
    """A float TIFF in 0..1, the usual convention, was cut to 0 (black); one past 255, to 255."""
    pixels = np.full((32, 32), value, np.float32)
    pixels[0, 0] = top  # the picture's maximum
    Image.fromarray(pixels).save(tmp_path / "float.tif")
    assert (read_image(tmp_path / "float.tif")[1:] == grey).all()


def exif_block(raw: bytes) -> int:
    """Where a JPEG's EXIF block, a TIFF structure, starts."""
    return raw.index(b"Exif\0\0") + 6


def first_directory(raw: bytes, tiff: int) -> tuple[int, str]:
    """The offset of the first tag directory of the TIFF structure at `tiff` (a TIFF file, or
    a photo's EXIF block), and its byte order."""
    order = "little" if raw[tiff:tiff + 2] == b"II" else "big"
    return tiff + int.from_bytes(raw[tiff + 4:tiff + 8], order), order


def retyped(path: Path, tiff: int, tag: int) -> None:
    """Damage `tag` of the TIFF structure at `tiff` in file `path`: its type becomes text
    (ASCII), as a buggy writer or a flipped byte leaves it, its value's bytes unchanged."""
    raw = bytearray(path.read_bytes())
    directory, order = first_directory(raw, tiff)
    count = int.from_bytes(raw[directory:directory + 2], order)
    (entry,) = [e for e in range(directory + 2, directory + 2 + 12 * count, 12)
                if int.from_bytes(raw[e:e + 2], order) == tag]
    raw[entry + 2:entry + 4] = (2).to_bytes(2, order)
    path.write_bytes(bytes(raw))


@pytest.mark.filterwarnings("error")
def test_damaged_metadata_and_nan_pixels_are_read_without_warnings(tmp_path):
    """A photo's corrupt EXIF block (its pixels intact) and a float TIFF's NaN: PIL and numpy
    warned on stderr without naming the file; the pixels are read, NaN as black."""
    pixels = np.random.default_rng(2).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    photo = Image.fromarray(pixels)
    exif = photo.getexif()
    exif[0x010F] = "Camera"  # Make
    photo.save(tmp_path / "photo.jpg", exif=exif)
    raw = bytearray((tmp_path / "photo.jpg").read_bytes())
    first_ifd, order = first_directory(raw, exif_block(raw))
    raw[first_ifd:first_ifd + 2] = (40).to_bytes(2, order)  # 40 entries where there is one
    (tmp_path / "photo.jpg").write_bytes(bytes(raw))
    assert read_image(tmp_path / "photo.jpg").shape == (32, 32, 3)
    Image.fromarray(np.full((32, 32), np.nan, np.float32)).save(tmp_path / "nan.tif")
    assert (read_image(tmp_path / "nan.tif") == 0).all()


@pytest.mark.parametrize("tag, value", [(0x011A, 72.0), (0x0128, 2)],
                         ids=["XResolution", "ResolutionUnit"])
def test_a_photo_whose_exif_cannot_be_applied_is_read_as_stored(tmp_path, tag, value):
    """A photo taken sideways (orientation 6) whose rational XResolution or short
    ResolutionUnit became text: PIL's rewrite of the EXIF block raised TypeError or
    struct.error, a traceback of predict and of --dataset folder. EXIF is only metadata: the
    pixels are read as they are stored."""
    path = tmp_path / "photo.jpg"
    photo = Image.fromarray(np.random.default_rng(3).integers(0, 256, (48, 64, 3), np.uint8))
    exif = photo.getexif()
    exif[0x0112], exif[tag] = 6, value  # Orientation: turn it a quarter to stand upright
    photo.save(path, exif=exif)
    retyped(path, exif_block(path.read_bytes()), tag)
    with Image.open(path) as stored:
        assert stored.getexif()[0x0112] == 6  # the orientation itself is intact
        want = stored.convert("RGB").resize((32, 32), Image.Resampling.LANCZOS)
    np.testing.assert_array_equal(read_image(path), np.asarray(want))


def test_a_picture_pil_fails_on_with_any_error_is_named(tmp_path):
    """A TIFF whose StripOffsets tag became text: PIL's load raises TypeError, which was a
    traceback (only OSError, ValueError and SyntaxError were taken for damaged files)."""
    path = tmp_path / "strips.tif"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(path)
    retyped(path, 0, 0x0111)
    with pytest.raises(DataError, match=f"^{path}: cannot decode it .*; the file is damaged"):
        read_image(path)


DECODE_IN_TOO_LITTLE_MEMORY = """
import resource, sys
from pathlib import Path
from PIL import Image
from loaders.images import read_image
path = Path(sys.argv[1])
Image.new("1", (9000, 9000)).save(path)  # 10 kB of PNG, 81 MB once decoded
size = int(Path("/proc/self/statm").read_text().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (size + 40 * 2**20, resource.RLIM_INFINITY))
try:
    read_image(path)
except MemoryError:
    print("MemoryError")
"""


def test_a_picture_too_big_for_the_memory_left_is_out_of_memory_not_damaged(tmp_path):
    """A real failed allocation while decoding is the machine's limit, which the command names
    as such (common.cli): never 'the file is damaged or not an image'."""
    result = run_code(DECODE_IN_TOO_LITTLE_MEMORY, tmp_path / "big.png")
    assert result.returncode == 0 and result.stdout == "MemoryError\n", result.stderr[-2000:]


def test_downscaling_averages_instead_of_sampling(tmp_path):
    # a one-pixel checkerboard: an antialiasing filter gives grey, nearest sampling black/white
    board = (np.indices((320, 320)).sum(0) % 2 * 255).astype(np.uint8)
    Image.fromarray(board).save(tmp_path / "board.png")
    image = read_image(tmp_path / "board.png").astype(int)
    assert np.abs(image - 127.5).max() < 20


@pytest.mark.parametrize("name", ["text.png", "empty.png", "missing.png"])
def test_unreadable_files_are_named(tmp_path, name):
    write_pictures(tmp_path)
    with pytest.raises(DataError, match=name):
        read_image(tmp_path / name)


def test_a_pipe_is_named_as_no_file_and_never_opened(tmp_path):
    """A pipe (or /dev/zero) exists: 'no such file' sent the user looking for it. Opened, a
    pipe with no writer would wait forever."""
    os.mkfifo(tmp_path / "pipe.png")
    with pytest.raises(DataError, match="pipe.png is a device, pipe or socket, not a file; "
                                        "pass a picture file$"):
        read_image(tmp_path / "pipe.png")
    with pytest.raises(DataError, match="missing.png: no such file$"):
        read_image(tmp_path / "missing.png")
    (tmp_path / "loop.png").symlink_to("loop.png")  # 'no such file', though ls shows it
    with pytest.raises(DataError, match="loop.png is a symbolic link that cannot be followed"):
        read_image(tmp_path / "loop.png")


@pytest.mark.parametrize("limit", [200_000, 100_000])  # PIL warns above it, refuses above 2x
def test_enormous_pictures_are_refused_by_name(tmp_path, monkeypatch, limit):
    path = write_pictures(tmp_path)["big.jpg"]  # 640 x 480 = 307,200 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    with pytest.raises(DataError, match=r"big\.jpg: over .* shrink it first"):
        read_image(path)


def test_folders_expand_to_sorted_image_files(tmp_path):
    write_pictures(tmp_path / "pics")
    (tmp_path / "pics" / "notes.txt").write_text("skip me")
    Image.new("RGB", (8, 8)).save(tmp_path / "pics" / "CAMERA.JPG")  # a camera's upper case
    files = expand([tmp_path / "pics", tmp_path / "extra.png"])
    names = [p.name for p in files]
    assert names[:-1] == sorted(names[:-1]) and "notes.txt" not in names
    assert names[-1] == "extra.png" and "CAMERA.JPG" in names and len(names) == 11


def test_a_folders_pictures_are_its_files_of_every_suffix(tmp_path: Path) -> None:
    """Each suffix taken (.jpeg as well as .jpg, .tiff, .webp, ...), lower or upper case, is a
    picture of the folder, in name order; a sub-folder named like a picture is not read."""
    suffixes = ("png", "jpg", "jpeg", "bmp", "gif", "tif", "tiff", "webp")
    pictures = [tmp_path / name for s in suffixes for name in (f"a.{s}", f"B.{s.upper()}")]
    for path in pictures:
        path.touch()  # listed, not read: any bytes will do
    (tmp_path / "album.jpeg").mkdir()
    (tmp_path / "album.jpeg" / "c.png").touch()
    assert expand([tmp_path]) == sorted(pictures)


@pytest.mark.parametrize("folders", [("a", "b"), ("a", "b", "c"), ("a", "b", "c", "d")])
def test_a_folder_of_folders_says_its_sub_folders_are_not_read(tmp_path: Path,
                                                              folders: tuple[str, ...]) -> None:
    """A folder holding only sub-folders (one per class, say) was said to hold no image files,
    leaving the user to guess that sub-folders are not searched; now it names a few to pass
    (three, then '...' where there are more), and no file beside them (a note, a .txt)."""
    for name in folders:
        (tmp_path / "photos" / name).mkdir(parents=True)
    (tmp_path / "photos" / "b.txt").write_text("not a picture, not a folder")
    with pytest.raises(DataError) as refused:
        prediction.read_pictures([tmp_path / "photos"])
    shown = " ".join(str(tmp_path / "photos" / name) for name in folders[:3])
    more = " ..." if len(folders) > 3 else ""
    assert f"(in any case), not its sub-folders (pass those: {shown}{more}); pass a picture" in (
        str(refused.value))


def test_cams_survive_odd_channels_last_batches():
    # torch 2.14's CPU backward crashed the process on channels_last batches of 3, 5, 7, ...
    # (engine.model.PointwiseConv routes around it; tests/test_model.py sweeps the shapes)
    from engine.model import build_model
    from tools.cams import cams

    model = build_model("resnet18", 10, 8).eval()
    augment = Augment(None, [0.5] * 3, [0.25] * 3, torch.float32, "cpu")
    pixels = torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8)
    maps = cams(model, augment(pixels), np.zeros(3, dtype=int), "layer3")
    assert maps.shape == (3, 32, 32) and np.isfinite(maps).all()


# --- the command line on a trained model -------------------------------------------------


@pytest.mark.slow
def test_mixed_folder_classifies_the_pictures_and_names_the_rest(run_dir, ckpt, tmp_path):
    paths = write_pictures(tmp_path / "pics")
    result = predict(run_dir / "ckpt.pt", tmp_path / "pics", "--json", "-k", "10")
    assert result.returncode == 1  # two files failed
    assert "Traceback" not in result.stderr
    bad = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(bad) == 2 and any("text.png" in b for b in bad) and any("empty.png" in b
                                                                     for b in bad)
    rows = {Path(r["file"]).name: r for r in json.loads(result.stdout)}
    assert set(rows) == set(paths)
    assert "error" in rows["text.png"] and "error" in rows["empty.png"]
    for name in set(paths) - {"text.png", "empty.png"}:
        predictions = rows[name]["predictions"]
        probs = [p["probability"] for p in predictions]
        assert [p["class"] for p in predictions] != [] and probs == sorted(probs, reverse=True)
        assert {p["class"] for p in predictions} == set(ckpt["classes"])
        assert sum(probs) == pytest.approx(1, abs=1e-5)


@pytest.mark.slow
def test_json_of_no_readable_picture_is_still_a_list_of_their_errors(run_dir, tmp_path):
    """--json is for scripts: where no picture could be read it is still the JSON list, of
    {file, error} rows, not an empty stdout (which a script's json.loads fails on), while the
    table, which would be a lone header, is left out."""
    (tmp_path / "text.png").write_text("not a picture")
    result = predict(run_dir / "ckpt.pt", tmp_path / "text.png", tmp_path / "missing.png",
                     "--json")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    rows = json.loads(result.stdout)
    assert [Path(r["file"]).name for r in rows] == ["text.png", "missing.png"]
    assert all(set(r) == {"file", "error"} for r in rows)


@pytest.mark.slow
def test_a_folders_dead_link_and_pipe_are_named_not_left_out(run_dir, tmp_path):
    """A picture's link whose file was moved, and a pipe of a picture's name, were left out
    of a folder's results without a word (given by name, each is named)."""
    pics = tmp_path / "pics"
    pics.mkdir()
    Image.new("RGB", (32, 32), "red").save(pics / "a.png")
    (pics / "gone.png").symlink_to(tmp_path / "moved.png")
    os.mkfifo(pics / "pipe.jpg")
    (pics / "sub.png").mkdir()  # a sub-folder: not read
    result = predict(run_dir / "ckpt.pt", pics, "--json")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    rows = {Path(r["file"]).name: r for r in json.loads(result.stdout)}
    assert sorted(rows) == ["a.png", "gone.png", "pipe.jpg"] and "predictions" in rows["a.png"]
    bad = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(bad) == 2 and "gone.png" in bad[0] and "pipe.jpg is a device, pipe or socket" \
        in bad[1], bad


@pytest.mark.slow
def test_saved_test_images_get_the_models_own_answers(run_dir, ckpt, tmp_path):
    """Test images saved as PNGs get, each in its own row, every class's probability the
    model gives the .beton's pixels (RGB, normalized with the checkpoint's mean and std), in
    falling order: only the top class of most of them was compared, so a row showing another
    picture's probabilities passed. -k beyond the classes shows each class once."""
    split = beton.read(Path(ckpt["data"]["test"]))
    images = split.images[:N_CIFAR]
    for i, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / f"{i:03d}.png")
    model = checkpoint.model_from(ckpt)
    augment = Augment(None, ckpt["mean"], ckpt["std"], torch.float32, "cpu")
    with torch.no_grad():
        expected = model(augment(torch.from_numpy(images))).softmax(1).numpy()
    result = predict(run_dir / "ckpt.pt", tmp_path, "--json", "-k", len(ckpt["classes"]) + 1)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(result.stdout)
    assert [Path(row["file"]).name for row in rows] == [f"{i:03d}.png" for i in range(N_CIFAR)]
    for row, want in zip(rows, expected, strict=True):
        probabilities = [p["probability"] for p in row["predictions"]]
        assert probabilities == sorted(probabilities, reverse=True), row["file"]
        assert len(probabilities) == len(ckpt["classes"]), row["file"]
        got = {p["class"]: p["probability"] for p in row["predictions"]}
        np.testing.assert_allclose([got[c] for c in ckpt["classes"]], want, atol=1e-5,
                                   err_msg=row["file"])


@pytest.mark.slow
def test_table_and_cam_overlays(run_dir, tmp_path):
    paths = write_pictures(tmp_path / "pics")
    good = [p for n, p in paths.items() if n not in ("text.png", "empty.png")]
    good[0] = good[0].rename(good[0].with_name("two\nlines.png"))  # any name a file may have
    result = predict(run_dir / "ckpt.pt", *good, paths["text.png"], "--cam", tmp_path / "cams",
                     "--layer", "layer2")  # a file that is no picture: the others still drawn
    assert result.returncode == 1, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["file", "top-1", "top-2", "top-3"]
    assert len(lines) == 1 + len(good)  # a row per picture, its name's line break escaped
    assert lines[1].startswith(f"{good[0].parent}/two\\nlines.png  ")
    column = lines[0].index("top-1")  # aligned: every row's first class starts under top-1
    assert all(line[column - 2:column] == "  " and line[column] != " " for line in lines[1:])
    overlays = sorted((tmp_path / "cams").iterdir())
    assert [p.name for p in overlays] == sorted(f"{p.stem}.cam.png" for p in good)
    assert all(Image.open(p).size == (256, 256) for p in overlays)
    error, wrote = result.stderr.splitlines()  # the count of pictures read, not of files given
    assert error.startswith(f"error: {paths['text.png']}: ")
    assert wrote == f"wrote {len(good)} Grad-CAM overlays (layer2) to {tmp_path / 'cams'}/"


def test_an_overlay_of_a_picture_with_a_long_name_fits_a_file_name():
    """A 251-byte stem and '.cam.png' made 259 bytes: 'File name too long; choose a
    writable --cam', which no --cam would fix. Cut, the names stay apart when numbered."""
    long = "é" * 125 + "x"  # 251 bytes, a 255-byte picture name with .png
    names = prediction.cam_names([Path(f"a/{long}.png"), Path(f"b/{long}.jpg")])
    assert all(len(name.encode()) <= 255 for name in names)
    assert names[0].startswith("é" * 119) and names[0].endswith(".cam.png")
    assert names[1] == names[0].removesuffix(".cam.png") + "-2.cam.png"


def test_overlays_of_three_pictures_of_one_name_are_three_files():
    """Pictures of one name in three folders: a number each from the second on, never the
    same name twice (the third overwrote the second's overlay)."""
    names = prediction.cam_names([Path("a/cat.png"), Path("b/cat.png"), Path("c/cat.jpg")])
    assert names == ["cat.cam.png", "cat-2.cam.png", "cat-3.cam.png"]


def test_a_numbered_overlays_picture_is_named_on_one_line():
    """The line counting the overlays names each picture whose overlay is numbered: a folder
    or file name with a line break (any name a file may have) is escaped, as in the table, so
    the line stays one line; the overlay named as it is, only the numbered ones."""
    files = [Path("a/cat.png"), Path("b\nc/cat.png"), Path("tab\tdir/dog.png")]
    names = prediction.cam_names(files)
    assert prediction.renamed(files, names) == ["b\\nc/cat.png as cat-2.cam.png"]


@pytest.mark.slow
def test_the_count_of_overlays_says_which_picture_a_numbered_one_is(run_dir, tmp_path):
    """Pictures named cat.png in seven folders (photos per day, say): the overlays of all but
    the first are numbered, cat-2.cam.png on, which the table (of pictures) did not say; the
    line counting the overlays names the first five, then how many more, as every list in a
    message does, all on one line. Two pictures: the one numbered. One picture: '1 overlay'."""
    picture = next(p for n, p in write_pictures(tmp_path / "pics").items()
                   if n not in ("text.png", "empty.png"))
    cats = [tmp_path / f"day{i}" / "cat.png" for i in range(7)]
    for cat in cats:
        cat.parent.mkdir()
        shutil.copy(picture, cat)
    result = predict(run_dir / "ckpt.pt", *cats, "--cam", tmp_path / "cams")
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "cams").iterdir()) == sorted(
        ["cat.cam.png"] + [f"cat-{i}.cam.png" for i in range(2, 8)])
    named = "; ".join(f"{cats[i]} as cat-{i + 1}.cam.png" for i in range(1, 6))
    assert result.stderr.splitlines()[-1] == (f"wrote 7 Grad-CAM overlays (layer3) to "
                                              f"{tmp_path / 'cams'}/; {named} and 1 more")
    result = predict(run_dir / "ckpt.pt", *cats[:2], "--cam", tmp_path / "two")
    assert result.stderr.splitlines()[-1] == (f"wrote 2 Grad-CAM overlays (layer3) to "
                                              f"{tmp_path / 'two'}/; {cats[1]} as cat-2.cam.png")
    result = predict(run_dir / "ckpt.pt", cats[0], "--cam", tmp_path / "one")
    assert result.stderr.splitlines()[-1] == \
        f"wrote 1 Grad-CAM overlay (layer3) to {tmp_path / 'one'}/"


@pytest.mark.slow
def test_bad_checkpoint_and_layer_are_one_message(run_dir, tmp_path, capsys):
    """A file that is no checkpoint, a --layer the model lacks, a picture that is not there or
    is no picture: exit 1 and one error line naming it, no traceback, no --cam folder made,
    and no table of no picture (a lone header). The first is a real process; the others run
    through the command's main."""
    picture = write_pictures(tmp_path)["one.png"]
    junk = tmp_path / "junk.pt"
    junk.write_text("junk")
    result = predict(junk, picture)
    assert result.returncode == 1 and result.stdout == "", result.stderr[-2000:]
    assert result.stderr.startswith(f"error: {junk} is not a readable checkpoint (")
    assert len(result.stderr.splitlines()) == 1, result.stderr  # no traceback
    text = tmp_path / "text.png"
    text.write_text("not a picture")  # read, but no picture in it
    for args, said in (
            ((picture, "--cam", tmp_path / "c", "--layer", "layer9"),
             "error: --layer layer9: the model has no such layer; choose from stem, layer1, "
             "layer2, layer3, layer4 (or a block such as layer3.1).\n"),
            ((tmp_path / "nothing-here",), f"error: {tmp_path / 'nothing-here'}: no such file\n"),
            ((text,), f"error: {text}: not a readable image; pass a picture file (PNG, JPEG, "
                      "BMP, GIF, TIFF, WebP or another format PIL reads)\n")):
        result = in_process(capsys, predict_command.main, run_dir / "ckpt.pt", *args)
        assert (result.returncode, result.stdout, result.stderr) == (1, "", said)
    assert not (tmp_path / "c").exists()


@pytest.mark.slow
def test_a_cam_layer_without_a_feature_map_is_refused_before_any_work(run_dir, tmp_path):
    """fc exists but has no spatial map: refused by predict's own option name before any
    picture is classified, and --cam's folder is not made."""
    picture = write_pictures(tmp_path)["one.png"]
    result = predict(run_dir / "ckpt.pt", picture, "--cam", tmp_path / "c", "--layer", "fc")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith("error: --layer fc: ") and "layer3" in result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert not (tmp_path / "c").exists()


@pytest.mark.slow
def test_a_cam_folder_that_is_a_file_is_refused_before_any_work(run_dir, tmp_path):
    picture = write_pictures(tmp_path)["one.png"]
    (tmp_path / "afile").write_text("mine")
    result = predict(run_dir / "ckpt.pt", picture, "--cam", tmp_path / "afile")
    assert result.returncode == 1 and result.stdout == ""  # nothing classified first
    assert result.stderr == (f"error: --cam {tmp_path / 'afile'} is a file, not a folder; "
                             "choose a writable folder.\n")
    assert (tmp_path / "afile").read_text() == "mine"


def test_the_table_ends_no_line_in_padding():
    """The columns are padded to line up, but a line's last cell is not: the padding of a
    short class name (cat beside airplane) left trailing spaces on its row. A file that
    could not be read has no row (its error is on stderr)."""
    def row(name: str, *classes: tuple[str, float]) -> dict:
        return {"file": name, "predictions": [{"class": c, "probability": p} for c, p in classes]}

    lines = predict_command.table([row("a.png", ("airplane", 0.9), ("cat", 0.1)),
                                   row("long-name.png", ("cat", 0.6), ("airplane", 0.4)),
                                   {"file": "bad.png", "error": "cannot decode it"}]).splitlines()
    assert [line.split() for line in lines] == [
        ["file", "top-1", "top-2"], ["a.png", "airplane", "90.0%", "cat", "10.0%"],
        ["long-name.png", "cat", "60.0%", "airplane", "40.0%"]]
    assert all(line == line.rstrip() for line in lines), lines


def test_a_layer_without_cam_is_a_usage_error(tmp_path, capsys):
    """--layer only chooses what --cam draws: without --cam it was ignored, even --layer fc,
    where tools refuse an option they would ignore (lr_find does)."""
    with pytest.raises(SystemExit) as exit:
        predict_command.main([str(tmp_path / "ckpt.pt"), str(tmp_path / "a.png"), "--layer",
                              "fc"])
    assert exit.value.code == 2
    assert capsys.readouterr().err == (
        "python tools/predict.py: error: --layer: only --cam draws Grad-CAM maps, so without "
        "it --layer would be ignored; add --cam DIR or leave --layer out; see --help\n")


@pytest.mark.slow
def test_a_cam_run_with_no_readable_picture_leaves_no_folder(run_dir, tmp_path, capsys):
    """The --cam folder was made before any picture was read, and left empty when none could
    be, with the folders made above it; a folder that was there stays. The first run is a
    real process; the other five run through the command's main."""
    (tmp_path / "no-pictures").mkdir()
    text = tmp_path / "text.png"
    text.write_text("not a picture")
    (tmp_path / "mine").mkdir()
    errors = {
        (tmp_path / "no-pictures",): (
            f"error: no image files in {tmp_path / 'no-pictures'}; a folder's pictures are its "
            "files named .bmp .gif .jpeg .jpg .png .tif .tiff .webp (in any case); pass a "
            "picture with another suffix by its file name.\n"),
        (text, tmp_path / "missing.png"): (
            f"error: {text}: not a readable image; pass a picture file (PNG, JPEG, BMP, GIF, "
            "TIFF, WebP or another format PIL reads)\n"
            f"error: {tmp_path / 'missing.png'}: no such file\n")}
    runs = [(pictures, said, cam) for pictures, said in errors.items()
            for cam in (tmp_path / "cams", tmp_path / "new" / "cams", tmp_path / "mine")]
    ways = [predict, *[partial(in_process, capsys, predict_command.main)] * (len(runs) - 1)]
    for way, (pictures, said, cam) in zip(ways, runs, strict=True):
        result = way(run_dir / "ckpt.pt", *pictures, "--cam", cam)
        assert (result.returncode, result.stdout, result.stderr) == (1, "", said)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "no-pictures", "text.png"]
        assert list((tmp_path / "mine").iterdir()) == []


@pytest.mark.slow
def test_a_full_disk_leaves_no_overlay_of_the_run(run_dir, tmp_path):
    """Overlays were written one by one into --cam: a full disk left some of them there, and
    the folder the run made. Now none is left, nor a hidden folder; a folder that was there
    keeps what it held, an older overlay of the same name too; the error names --cam."""
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    rng = np.random.default_rng(3)
    for i in range(45):  # about 360 KiB of overlays
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
            pictures / f"p{i:02d}.png")
    with tmpfs(tmp_path / "full", "size=200k") as full:
        (full / "mine").mkdir()
        (full / "mine" / "p00.cam.png").write_bytes(b"an older overlay")
        (full / "mine" / "notes.txt").write_text("mine")
        for cam in (full / "new", full / "mine"):
            before = tree(full)
            result = predict(run_dir / "ckpt.pt", pictures, "--cam", cam)
            assert result.returncode == 1
            assert tree(full) == before and sorted(p.name for p in full.iterdir()) == ["mine"]
            assert result.stderr == (f"error: --cam {cam}: its disk is full, so the overlays "
                                     "could not be written (nothing was left there); free some "
                                     "space or choose another --cam.\n")


def test_k_above_the_number_of_classes_lists_every_class_once(run_dir, ckpt, tmp_path):
    """-k 20 of a 10-class model: its 10 classes, not torch's 'selected index k out of range'."""
    paths = write_pictures(tmp_path / "pics")
    classifier = prediction.load_classifier(run_dir / "ckpt.pt", torch.device("cpu"))
    pictures = prediction.read_pictures([paths["rgba.png"], paths["big.jpg"]])
    rows, predicted = prediction.top_classes(classifier, pictures, 2 * len(ckpt["classes"]))
    assert len(rows) == 2
    for row in rows:
        assert sorted(p["class"] for p in row["predictions"]) == sorted(ckpt["classes"])
    assert predicted.shape == (2,)


def test_a_model_giving_nan_is_named_a_broken_checkpoint_not_a_table(run_dir, tmp_path):
    """Weights that overflow to NaN logits: one line naming the checkpoint, no table of NaNs."""
    paths = write_pictures(tmp_path / "pics")
    classifier = prediction.load_classifier(run_dir / "ckpt.pt", torch.device("cpu"))
    with torch.no_grad():
        for parameter in classifier.model.parameters():
            parameter.fill_(3e38)
    pictures = prediction.read_pictures([paths["big.jpg"]])
    with pytest.raises(CheckpointError, match="NaN or infinite logits"):
        prediction.top_classes(classifier, pictures, 3)


def test_overlays_remove_the_hidden_folders_of_killed_cam_runs_only(run_dir, tmp_path):
    """A predict --cam killed mid-way (SIGKILL) leaves its hidden staging folder in --cam: the
    next run into it removes those of dead writers and keeps a live writer's."""
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True).stdout)
    out = tmp_path / "cams"
    stale, live = out / f".overlays.{dead}.tmp", out / f".overlays.{os.getppid()}.tmp"
    for folder in (stale, live):
        folder.mkdir(parents=True)
        (folder / "half.cam.png").write_bytes(b"half an overlay")
    paths = write_pictures(tmp_path / "pics")
    classifier = prediction.load_classifier(run_dir / "ckpt.pt", torch.device("cpu"))
    pictures = prediction.read_pictures([paths["big.jpg"]])
    _, predicted = prediction.top_classes(classifier, pictures, 3)
    prediction.write_cams(classifier, pictures, predicted, "layer3", out)
    assert sorted(p.name for p in out.iterdir()) == sorted([live.name, "big.cam.png"])


@pytest.mark.parametrize("device, cam, advice", [
    ("cuda", True, "try fewer pictures at a time or leave out --cam, or pass --device cpu."),
    ("cpu", False, "try fewer pictures at a time.")])
def test_running_out_of_memory_is_one_line_naming_what_to_lower(device, cam, advice):
    """Out of memory was a traceback (torch's errors are no EngineError): CUDA's, and a real
    failed allocation of the CPU allocator."""
    for fail in (cpu_out_of_memory, cuda_out_of_memory):
        with pytest.raises(ReportError) as refused, \
                prediction.memory_advice(torch.device(device), cam):
            fail()
        assert str(refused.value) == (f"out of memory classifying the pictures on {device}; "
                                      f"{advice}")


@pytest.mark.gpu
@pytest.mark.slow
def test_cuda_gives_the_cpu_answers(run_dir, tmp_path):
    """Every class's probability, within what CUDA's TF32 convolutions change (about 1e-3): a
    1-epoch model's near-flat top 3 may swap places, so ranks are not compared."""
    picture = write_pictures(tmp_path)["big.jpg"]
    answers = [json.loads(predict(run_dir / "ckpt.pt", picture, "--json", "-k", "10",
                                  "--device", d).stdout) for d in ("cpu", "cuda")]
    cpu, cuda = ({p["class"]: p["probability"] for p in a[0]["predictions"]} for a in answers)
    assert cpu.keys() == cuda.keys() and len(cpu) == 10
    for name, probability in cpu.items():
        assert cuda[name] == pytest.approx(probability, abs=5e-3), name


def test_unreadable_and_missing_pictures_name_every_format_taken(tmp_path):
    """The errors named PNG and JPEG alone, where BMP, GIF, TIFF and WebP are read too, and
    a folder's pictures are found by suffix."""
    (tmp_path / "notes.png").write_text("not a picture")
    with pytest.raises(DataError, match=r"notes\.png: not a readable image; pass a picture "
                                        r"file \(PNG, JPEG, BMP, GIF, TIFF, WebP or another"):
        read_image(tmp_path / "notes.png")
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.heic").write_bytes(b"\0" * 16)
    with pytest.raises(DataError, match=r"a folder's pictures are its files named \.bmp \.gif "
                                        r"\.jpeg \.jpg \.png \.tif \.tiff \.webp \(in any "
                                        r"case\); pass a picture with another suffix by its "
                                        r"file name\.$"):
        prediction.read_pictures([tmp_path / "photos"])


def test_rows_follow_the_files_given_each_unreadable_one_with_its_own_error(run_dir, tmp_path):
    """A script pairs --json's rows with the files it passed by position: an unreadable file
    keeps its place among the pictures (not moved after them), its row holds the message read
    it gave, and the class predicted for each picture (its overlay's) is its row's top-1."""
    paths = write_pictures(tmp_path / "pics")
    given = [paths["text.png"], paths["big.jpg"], tmp_path / "missing.png", paths["rgba.png"]]
    classifier = prediction.load_classifier(run_dir / "ckpt.pt", torch.device("cpu"))
    rows, predicted = prediction.top_classes(classifier, prediction.read_pictures(given), 3)
    assert [row["file"] for row in rows] == [str(path) for path in given]
    for row, path in ((rows[0], given[0]), (rows[2], given[2])):
        with pytest.raises(DataError) as unreadable:
            read_image(path)
        assert row == {"file": str(path), "error": str(unreadable.value)}
    assert [classifier.classes[c] for c in predicted] == [
        rows[i]["predictions"][0]["class"] for i in (1, 3)]


def test_overlays_of_several_batches_each_show_their_own_picture_and_class(
        run_dir, tmp_path, monkeypatch):
    """Overlays are drawn CAM_BATCH pictures at a time (here 2, for 5 pictures): each file
    is its own picture's Grad-CAM for the class it was given, in every batch, not the first
    batch's names or classes again."""
    from tools.cams import cams, overlay

    monkeypatch.setattr(prediction, "CAM_BATCH", 2)
    rng = np.random.default_rng(5)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), np.uint8)).save(tmp_path / f"p{i}.png")
    (tmp_path / "cams").mkdir()
    classifier = prediction.load_classifier(run_dir / "ckpt.pt", torch.device("cpu"))
    pictures = prediction.read_pictures([tmp_path])
    classes = np.array([0, 1, 2, 3, 4])
    prediction.write_cams(classifier, pictures, classes, "layer3", tmp_path / "cams")
    assert sorted(p.name for p in (tmp_path / "cams").iterdir()) == [
        f"p{i}.cam.png" for i in range(5)]
    for i, image in enumerate(pictures.images):
        alone = cams(classifier.model, classifier.to_input(torch.from_numpy(image[None])),
                     classes[i:i + 1], "layer3")
        want = np.asarray(Image.fromarray(overlay(image, alone[0])).resize(
            (256, 256), Image.Resampling.NEAREST))
        got = np.asarray(Image.open(tmp_path / "cams" / f"p{i}.cam.png"))
        assert np.abs(got.astype(int) - want).max() <= 2, i


def test_a_model_giving_nan_for_one_picture_of_several_is_a_broken_checkpoint(tmp_path):
    """Logits that overflow for one picture only: the checkpoint is still named broken, not a
    table whose row for that picture is nan%. Real layers whose logits are 1e36 times the sum
    of the input's positive values: infinite for a white picture, 0 for a black one."""
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.ReLU(), torch.nn.Linear(3072, 10))
    with torch.no_grad():
        model[2].weight.fill_(1e36)
        model[2].bias.zero_()
    to_input = checkpoint.model_input({"mean": [0.5] * 3, "std": [0.25] * 3}, "cpu")
    classifier = prediction.Classifier(model.eval(), to_input, [f"c{i}" for i in range(10)],
                                       tmp_path / "ckpt.pt")
    Image.new("RGB", (32, 32), "black").save(tmp_path / "black.png")
    Image.new("RGB", (32, 32), "white").save(tmp_path / "white.png")
    pictures = prediction.read_pictures([tmp_path])
    finite = prediction.classify(classifier, pictures.images).isfinite().all(1).tolist()
    assert finite == [True, False]  # black.png, white.png
    with pytest.raises(CheckpointError, match="ckpt.pt's model gives NaN or infinite logits"):
        prediction.top_classes(classifier, pictures, 3)
