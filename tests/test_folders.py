"""--dataset folder: an ImageFolder tree (train/<class>/*, test/<class>/*) written by PIL,
converted once into the CIFAR python format and .beton files, then used like CIFAR-10."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    FOLDER_CLASSES,
    ROOT,
    file_identities,
    run_script,
    tmpfs,
    without_root_powers,
    write_tree,
)
from PIL import Image

from common.errors import DataError
from loaders import beton, cifar, folders, make_loader, preparation
from loaders.preparation import prepare


def test_an_image_folder_becomes_betons_with_exactly_its_pixels(tmp_path):
    made = write_tree(tmp_path)
    prepared = prepare("folder", tmp_path, workers=1)
    assert prepared.classes == FOLDER_CLASSES
    for split, path in (("train", prepared.train), ("test", prepared.test)):
        read = beton.read(path)
        np.testing.assert_array_equal(read.images, made[split][0])  # 32x32 PNG: identity
        np.testing.assert_array_equal(read.labels, made[split][1])
    for kind in ("ffcv", "resident", "torchvision"):
        loader = make_loader(kind, prepared.test, train=False, batch_size=4, device="cpu",
                             mean=prepared.mean, std=prepared.std, workers=1)
        assert sum(len(labels) for _, labels in loader) == 9


def test_reading_in_threads_leaves_the_warning_filters_as_they_were(tmp_path):
    """Each thread entering warnings.catch_warnings restored the filters another had saved:
    PIL's left silenced, and a decompression bomb warning turned into an error, for the
    rest of the process."""
    made = write_tree(tmp_path, per_class=(40, 1))
    before = list(warnings.filters)
    images, labels = folders.read_splits(folders.class_files(tmp_path))["train"]
    assert list(warnings.filters) == before
    np.testing.assert_array_equal(images, made["train"][0])


def test_pictures_of_other_sizes_and_modes_become_32x32_rgb(tmp_path):
    """Pictures as they come (larger, greyscale, transparent, palette) are read as the
    predictions read them: scaled to 32x32, grey spread over R, G and B, transparency on
    white. Every picture write_tree makes is a 32x32 RGB PNG, which any reader reads alike."""
    write_tree(tmp_path, per_class=(1, 1))
    grey = np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) % 256
    pictures = {  # name: (picture, what it is read as)
        "a-large.png": (Image.new("RGB", (64, 48), (10, 200, 30)), (10, 200, 30)),
        "b-grey.png": (Image.fromarray(grey.astype(np.uint8), "L"), np.stack([grey] * 3, -1)),
        "c-clear.png": (Image.new("RGBA", (32, 32), (0, 0, 0, 0)), (255, 255, 255)),
        "d-palette.png": (Image.new("RGB", (32, 32), (0, 0, 255)).convert("P"), (0, 0, 255)),
    }
    for name, (picture, _) in pictures.items():
        picture.save(tmp_path / "train" / "dog" / name)
    images, labels = folders.read_splits(folders.class_files(tmp_path))["train"]
    assert images.shape == (7, 32, 32, 3) and list(labels) == [0, 1, 1, 1, 1, 1, 2]
    for image, (_, want) in zip(images[2:6], pictures.values(), strict=True):
        np.testing.assert_array_equal(image, np.broadcast_to(want, (32, 32, 3)))


def _converted(prepared) -> list[Path]:
    """What converting an image folder writes: its python folder, the files in it, the two
    .beton files and their sidecars."""
    betons = (prepared.train, prepared.test)
    return [prepared.source, *prepared.source.iterdir(), *betons, *map(beton.sidecar, betons)]


def test_the_conversion_is_cached_until_a_file_changes(tmp_path):
    """A second prepare of unchanged pictures reuses every file of the first (a conversion done
    again gives an equal Prepared: the files' inodes and times tell them apart); a picture
    added makes a new conversion, and the older one goes."""
    write_tree(tmp_path)
    first = prepare("folder", tmp_path, workers=1)
    before = file_identities(_converted(first))
    assert prepare("folder", tmp_path, workers=1) == first
    assert file_identities(_converted(first)) == before
    extra = tmp_path / "train" / "dog" / "new.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(extra)
    (tmp_path / "folder-notes").mkdir()  # not ours by name: kept
    second = prepare("folder", tmp_path, workers=1)
    assert second.source != first.source and len(beton.read(second.train).labels) == 19
    # the first state's copy is gone: a copy of the whole data each change kept otherwise
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("folder-")) == sorted(
        [second.source.name, "folder-notes", *(p.name for p in (second.train, second.test)),
         *(beton.sidecar(p).name for p in (second.train, second.test))])


def test_pictures_changed_while_waiting_for_the_lock_are_converted_under_their_name(
        tmp_path, monkeypatch):
    """prepare names the conversion, then waits for the lock (another process converting): a
    picture added meanwhile was converted under the earlier state's name, and those files
    swept at once as an older state's, so the paths it returned did not exist."""
    write_tree(tmp_path)
    lock = preparation.preparing

    def add_a_picture_meanwhile(data_dir: Path):
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "train/dog/new.png")
        return lock(data_dir)

    monkeypatch.setattr(preparation, "preparing", add_a_picture_meanwhile)
    prepared = prepare("folder", tmp_path, workers=1)
    assert len(beton.read(prepared.train).labels) == 19
    monkeypatch.undo()
    before = file_identities(_converted(prepared))
    assert prepare("folder", tmp_path, workers=1) == prepared
    assert file_identities(_converted(prepared)) == before  # this state's, reused


def test_an_image_moved_to_another_class_is_converted_again_with_that_label(tmp_path):
    """mv keeps a file's name, size and time, so its class folder is part of what the cached
    conversion is known by: here the moved cat is the last cat and the first dog, every file
    is listed in the same order as before, and only its label changed."""
    made = write_tree(tmp_path)
    dog = tmp_path / "train" / "dog"
    for path in dog.iterdir():  # dog's own pictures sort after the one moved in
        path.rename(dog / f"dog-{path.name}")
    first = prepare("folder", tmp_path, workers=1)
    os.rename(tmp_path / "train" / "cat" / "005.png", dog / "005.png")
    second = prepare("folder", tmp_path, workers=1)
    assert second.source != first.source
    read = beton.read(second.train)
    np.testing.assert_array_equal(np.bincount(read.labels), [5, 7, 6])
    moved = made["train"][0][5]  # cat 005, the sixth image of the tree as made
    (where,) = np.flatnonzero((read.images == moved).all(axis=(1, 2, 3)))
    assert FOLDER_CLASSES[read.labels[where]] == "dog"


def test_an_image_replaced_by_one_of_the_same_size_is_converted_again(tmp_path):
    """An uncompressed picture (BMP) replaced by another keeps its byte size: its modification
    time tells that the conversion is stale."""
    write_tree(tmp_path)
    path = tmp_path / "train" / "cat" / "replaced.bmp"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(path)
    first = prepare("folder", tmp_path, workers=1)
    size, mtime = path.stat().st_size, path.stat().st_mtime_ns
    Image.fromarray(np.full((32, 32, 3), 255, np.uint8)).save(path)
    os.utime(path, ns=(mtime + 10**9, mtime + 10**9))  # a second later, whatever the clock
    assert path.stat().st_size == size
    second = prepare("folder", tmp_path, workers=1)
    assert second.source != first.source
    images = beton.read(second.train).images
    assert (images == 255).all(axis=(1, 2, 3)).sum() == 1
    assert not (images == 0).all(axis=(1, 2, 3)).any()


def test_an_image_replaced_by_one_of_another_size_but_the_same_time_is_seen(tmp_path):
    """rsync -a and cp -p give a newer picture the source's older time: its size alone tells
    that the cached conversion is stale, which would otherwise train on the old picture."""
    write_tree(tmp_path)
    path = tmp_path / "train" / "cat" / "000.png"
    before = folders.fingerprint(tmp_path, folders.class_files(tmp_path))
    mtime = path.stat().st_mtime_ns
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(path)  # compresses far smaller
    os.utime(path, ns=(mtime, mtime))
    assert folders.fingerprint(tmp_path, folders.class_files(tmp_path)) != before


def test_a_linked_picture_whose_file_is_replaced_is_seen(tmp_path):
    """A tree of links to the pictures (splits made without copying them): the file linked to
    is what changes, the link keeps its own size and time, so those of the file are hashed."""
    write_tree(tmp_path)
    target = tmp_path / "elsewhere.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(target)
    (tmp_path / "train" / "cat" / "linked.png").symlink_to(target)
    before = folders.fingerprint(tmp_path, folders.class_files(tmp_path))
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32, 3), np.uint8)).save(
        target)
    assert folders.fingerprint(tmp_path, folders.class_files(tmp_path)) != before


def test_betons_of_the_pictures_need_no_python_folder(tmp_path):
    """Its python folder gone (deleted to save space), the .beton files named after these very
    pictures are used as they are: it was written again, without the lock or a check that
    the image folder can be written (a read-only one failed on a random temporary's name)."""
    write_tree(tmp_path)
    first = prepare("folder", tmp_path, workers=1)
    shutil.rmtree(first.source)
    again = prepare("folder", tmp_path, workers=1)
    assert (again.train, again.test, again.mean, again.classes) == (
        first.train, first.test, first.mean, first.classes)
    assert not first.source.exists()  # nothing was written


def test_images_in_sub_folders_of_a_class_are_its_images(tmp_path):
    """Sub-folders and linked folders count, as in torchvision's ImageFolder; ours: a link back
    up the tree counts once, hidden entries and FIFOs not at all, a dangling link is named."""
    write_tree(tmp_path)
    nested = tmp_path / "train" / "cat" / "2023" / "june"
    nested.mkdir(parents=True)
    for i in range(2):
        Image.fromarray(np.full((32, 32, 3), i, np.uint8)).save(nested / f"{i}.png")
    (tmp_path / "train" / "cat" / ".thumbs").mkdir()
    (tmp_path / "train" / "cat" / ".thumbs" / "x.png").write_text("not an image")
    (tmp_path / "train" / "cat" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")  # macOS's
    os.mkfifo(tmp_path / "train" / "dog" / "pipe.png")
    elsewhere = tmp_path.parent / f"{tmp_path.name}-elsewhere"
    shutil.copytree(nested, elsewhere)
    (tmp_path / "train" / "dog" / "more").symlink_to(elsewhere)
    (nested / "up").symlink_to(tmp_path / "train" / "cat")  # a loop
    files = folders.class_files(tmp_path)["train"]
    assert [len(files[c]) for c in FOLDER_CLASSES] == [6 + 2, 6 + 2, 6]
    assert files["cat"][-2:] == [nested / "0.png", nested / "1.png"]  # sorted by path
    prepared = prepare("folder", tmp_path, workers=1)
    assert len(beton.read(prepared.train).labels) == 22
    (tmp_path / "test" / "frog" / "gone.png").symlink_to(tmp_path / "moved.png")
    with pytest.raises(DataError, match=f"^{tmp_path}/test/frog/gone.png links to "
                                        f"{tmp_path}/moved.png, which does not exist"):
        prepare("folder", tmp_path, workers=1)
    (tmp_path / "test" / "frog" / "gone.png").unlink()
    (tmp_path / "test" / "frog" / "loop.png").symlink_to("loop.png")  # said not to exist
    with pytest.raises(DataError, match=f"^{tmp_path}/test/frog/loop.png links to loop.png, "
                                        "its links loop; restore it or delete the link"):
        prepare("folder", tmp_path, workers=1)


def test_one_dangling_link_is_one_link_to_restore_or_delete(tmp_path):
    """The whole message for a single link whose file is gone: 'it' and 'the link', in the
    singular (the test above matches its start only, which 'the links' also begins with)."""
    (tmp_path / "cat").mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "cat" / "0.png")
    (tmp_path / "cat" / "gone.png").symlink_to(tmp_path / "moved.png")
    with pytest.raises(DataError) as refused:
        folders.images_under(tmp_path / "cat")
    assert str(refused.value) == (f"{tmp_path}/cat/gone.png links to {tmp_path}/moved.png, "
                                  "which does not exist; restore it or delete the link.")


@pytest.mark.parametrize("locked", ["train/cat/2023", "test/frog"],
                         ids=["sub-folder", "class folder"])
def test_a_folder_that_cannot_be_read_is_named(tmp_path, locked):
    """os.walk skipped a folder it could not list without a word: a sub-folder's images were
    left out of the dataset, and an unreadable class folder was said to hold no images."""
    write_tree(tmp_path)
    (tmp_path / "train" / "cat" / "2023").mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "train/cat/2023/0.png")
    (tmp_path / locked).chmod(0)
    try:
        result = subprocess.run(without_root_powers(
            [sys.executable, ROOT / "loaders" / "prepare.py", "--dataset", "folder",
             "--data-dir", tmp_path]), capture_output=True, text=True, timeout=300, cwd=ROOT)
    finally:
        (tmp_path / locked).chmod(0o755)
    assert result.returncode == 1 and result.stderr == (
        f"error: {tmp_path / locked}: cannot be read (Permission denied); fix its permissions "
        "or remove it.\n")
    assert not list(tmp_path.glob("folder-*")) and not list(tmp_path.glob("*.beton"))


def test_unreadable_files_are_all_named(tmp_path):
    """Those of both splits in one error: the test split's were named only once the training
    split's were fixed, a round per split."""
    write_tree(tmp_path)
    (tmp_path / "train" / "cat" / "notes.png").write_text("not an image")
    (tmp_path / "test" / "frog" / "empty.jpg").write_bytes(b"")
    with pytest.raises(DataError) as error:
        prepare("folder", tmp_path, workers=1)
    message = str(error.value)
    assert message.startswith("2 files could not be read as images: ")
    assert f"{tmp_path / 'train' / 'cat' / 'notes.png'}: not a readable image" in message
    assert f"{tmp_path / 'test' / 'frog' / 'empty.jpg'}: not a readable image" in message
    assert not list(tmp_path.glob("*.beton")) and not list(tmp_path.glob("folder-*"))
    (tmp_path / "train" / "cat" / "notes.png").unlink()  # one fixed: the other, in the singular
    with pytest.raises(DataError) as error:
        prepare("folder", tmp_path, workers=1)
    assert str(error.value).startswith("1 file could not be read as images: ")


def test_many_unreadable_files_are_counted_past_the_first_three(tmp_path):
    """Five bad files: three named, with the number of the rest, in one line."""
    write_tree(tmp_path)
    for name in "abcde":
        (tmp_path / "train" / "cat" / f"{name}.png").write_text("not an image")
    with pytest.raises(DataError) as error:
        prepare("folder", tmp_path, workers=1)
    message = str(error.value)
    assert message.startswith("5 files could not be read as images: ")
    assert message.count(": not a readable image") == 3
    assert message.endswith(" and 2 more. Delete or replace them.")


@pytest.mark.parametrize("damage, words", [
    ("empty class", "no images in this class folder"),
    ("no test split", "test is missing"),
    ("no train split", "train is missing"),
    ("other classes", "hold different classes"),
    ("no classes", "has no class folders"),
    ("one class", "has only the class folder cat; a classifier needs at least 2 classes"),
    ("line break", r"names are blank or hold a line break, tab or other control character "
                   r"\('do\\ng'\); rename them"),
    ("tab", r"control character \('do\\tg'\); rename them"),
])
def test_a_malformed_tree_is_refused_naming_the_folder(tmp_path, damage, words):
    write_tree(tmp_path)
    if damage == "empty class":
        for f in (tmp_path / "test" / "dog").iterdir():
            f.unlink()
    elif damage == "no test split":
        os.rename(tmp_path / "test", tmp_path / "validation")
    elif damage == "no train split":  # listing it would end in a traceback (FileNotFoundError)
        os.rename(tmp_path / "train", tmp_path / "training")
    elif damage == "other classes":
        os.rename(tmp_path / "test" / "dog", tmp_path / "test" / "wolf")
    elif damage == "line break":  # one line per name in the report's tables and messages
        os.rename(tmp_path / "train" / "dog", tmp_path / "train" / "do\ng")
    elif damage == "tab":  # a tab would split the name across the report's columns
        os.rename(tmp_path / "train" / "dog", tmp_path / "train" / "do\tg")
    elif damage == "one class":
        for split in folders.SPLITS:
            for name in FOLDER_CLASSES[1:]:
                shutil.rmtree(tmp_path / split / name)
    else:
        for split in folders.SPLITS:
            for d in (tmp_path / split).iterdir():
                for f in d.iterdir():
                    f.unlink()
                d.rmdir()
    with pytest.raises(DataError, match=words) as error:
        cifar.load("folder", tmp_path)
    assert str(tmp_path) in str(error.value)


def test_files_beside_the_class_folders_are_no_classes(tmp_path):
    """A README or a .csv of labels in train/ is left out, as ImageFolder leaves it: taken
    for a class, it was refused as an empty class folder, and the whole tree with it. So is a
    hidden folder (Jupyter's .ipynb_checkpoints, with a picture in it): taken for a class, it
    would be trained on as one more class."""
    write_tree(tmp_path)
    for split in folders.SPLITS:
        (tmp_path / split / "README.txt").write_text("CINIC-10, a subset")
        (tmp_path / split / ".ipynb_checkpoints").mkdir()
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(
            tmp_path / split / ".ipynb_checkpoints" / "000.png")
    files = folders.class_files(tmp_path)
    assert [list(files[split]) for split in folders.SPLITS] == [FOLDER_CLASSES] * 2


def test_every_problem_of_one_split_is_named_in_one_error(tmp_path):
    """A tab in a class name, an empty class folder and two links to moved files in one split:
    each was named only once the one before it was fixed, a round of fixes per problem."""
    write_tree(tmp_path)
    train = tmp_path / "train"
    os.rename(train / "dog", train / "do\tg")
    for f in (train / "cat").iterdir():
        f.unlink()
    for name in ("a.png", "b.png"):
        (train / "frog" / name).symlink_to(tmp_path / "moved" / name)
    with pytest.raises(DataError) as error:
        folders.class_files(tmp_path)
    assert str(error.value) == (
        f"{train} has class folders whose names are blank or hold a line break, tab or other "
        "control character ('do\\tg'); rename them. "
        f"{train}/frog/a.png links to {tmp_path}/moved/a.png, which does not exist; "
        f"{train}/frog/b.png links to {tmp_path}/moved/b.png, which does not exist; restore "
        f"them or delete the links. {train}/cat: no images in this class folder; add some or "
        "remove the folder.")


def test_both_splits_problems_are_named_in_one_error(tmp_path):
    """An empty class folder in each split, two in the training split: the test split's was
    named only once the training split's was fixed, a round of fixes per split; and every
    empty folder of a split is named, not the first of them."""
    write_tree(tmp_path)
    for split, name in (("train", "cat"), ("train", "frog"), ("test", "frog")):
        for f in (tmp_path / split / name).iterdir():
            f.unlink()
    with pytest.raises(DataError) as error:
        folders.class_files(tmp_path)
    train, test = (tmp_path / split for split in folders.SPLITS)
    assert f"{train / 'cat'}, {train / 'frog'}: no images in this class folder" in str(
        error.value)
    assert f"{test / 'frog'}: no images in this class folder" in str(error.value)


def test_names_that_are_no_utf8_are_converted_and_read_as_latin1(tmp_path):
    """Folders and files named in an older encoding (bytes that are no UTF-8) are used; the
    class reads as Latin-1 text."""
    made = write_tree(tmp_path)
    for split in folders.SPLITS:
        os.rename(tmp_path / split / "cat", tmp_path / split / os.fsdecode(b"caf\xe9"))
    # the last file of its class: sorted by name, it stays last
    os.rename(tmp_path / "train" / "dog" / "005.png",
              tmp_path / "train" / "dog" / os.fsdecode(b"\xff.png"))
    prepared = prepare("folder", tmp_path, workers=1)
    assert prepared.classes == ["caf\u00e9", "dog", "frog"]
    read = beton.read(prepared.train)
    np.testing.assert_array_equal(read.images, made["train"][0])
    np.testing.assert_array_equal(read.labels, made["train"][1])


def test_an_older_conversion_that_is_a_link_is_unlinked_not_followed(tmp_path):
    """A folder-<hash> entry that is a link to a folder (a conversion moved to another disk)
    goes as a link: rmtree refuses links, and with its errors ignored the link stayed."""
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "data_batch_1").write_text("kept")
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "folder-0123456789abcdef").symlink_to(target)
    (tmp_path / "pics" / "folder-fedcba9876543210").mkdir()
    preparation.sweep_older_conversions(tmp_path / "pics", "folder-fedcba9876543210")
    assert [p.name for p in (tmp_path / "pics").iterdir()] == ["folder-fedcba9876543210"]
    assert (target / "data_batch_1").read_text() == "kept"


def test_a_full_disk_while_converting_names_the_folder(tmp_path):
    """The images fill most of a small disk: their python-format copy does not fit."""
    with tmpfs(tmp_path / "disk", "size=256k") as disk:
        write_tree(disk, per_class=(10, 4))
        result = run_script("loaders/prepare.py", "--dataset", "folder", "--data-dir", disk,
                            timeout=120)
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert result.stderr.startswith(f"error: Writing {disk}/folder-")
        assert f"failed (No space left on device); it needs about 0.1 MB in {disk}. Nothing " \
               "was kept" in result.stderr
        assert sorted(p.name for p in disk.iterdir()) == sorted(folders.SPLITS)  # nothing left


@pytest.mark.slow
def test_training_and_report_run_unchanged_on_an_image_folder(tmp_path):
    write_tree(tmp_path / "images", per_class=(40, 10))
    out = tmp_path / "run"
    result = run_script("engine/train.py", "--dataset", "folder", "--data-dir",
                        tmp_path / "images", "--width", "8", "--epochs", "1", "--batch-size",
                        "32", "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    result = run_script("tools/report.py", out / "ckpt.pt", "-n", "3")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "cat" in (out / "report" / "per_class.csv").read_text()
