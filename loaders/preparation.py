"""A dataset by name as train/test .beton files in a data folder: downloaded when needed,
validated, converted once and reused while its source is unchanged. Training, the tools and
`python loaders/prepare.py` all call prepare, so they all take the same path."""

from __future__ import annotations

import logging
import re
import shutil
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

from common.errors import DataError
from common.hardware import default_workers
from common.locks import waiting_lock
from common.output_folders import missing_folders, removed_on_failure
from common.paths import nearest_existing, not_a_folder, unwritable
from loaders import beton, cifar
from loaders.download import EXTRACT_PREFIX, PART_SUFFIX, Unfetched, part_prefix
from loaders.folders import SPLITS
from loaders.guards import numba_settings_checked
from loaders.layouts import LAYOUTS
from loaders.options import SYNTHETIC_SIZE
from loaders.python_folder import IMAGE_FOLDER_PATTERN, staging_prefix

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prepared:
    """Everything a loader or a report needs to know about a converted dataset."""

    name: str
    classes: list[str]
    train: Path
    test: Path
    mean: list[float]
    std: list[float]
    source: Path  # the python-format folder the .beton files were made from


def check_data_dir(data_dir: Path | str, writing: bool = True, why: str = "") -> None:
    """DataError naming data_dir when it cannot hold the data (a file, or, when something must
    be written there, a folder that cannot be, with `why` it must), raised before any download
    or conversion."""
    if not str(data_dir).strip():  # a library caller's "" (Path("") would mean ".")
        raise DataError("The data folder is empty (''); name a folder, e.g. --data-dir data.")
    existing = nearest_existing(Path(data_dir))  # a folder still to be made is made in this one
    if not existing.is_dir():
        raise DataError(f"--data-dir {data_dir}: {existing} {not_a_folder(existing)}; pass a "
                        "folder (it is created when missing).")
    problem = unwritable(existing) if writing else None
    if problem:  # read-only (a mount, modes), or a disk out of space or inodes: the reason
        because = f", and the data must be written there again: {why}" if why else ""
        raise DataError(f"--data-dir {data_dir}: {existing} {problem}{because}; pass a folder "
                        "you can write to, with free space, or fix this one.")


def prepare(name: str, data_dir: Path, synthetic_size: tuple[int, int] = SYNTHETIC_SIZE,
            workers: int | None = None) -> Prepared:
    """Make sure data_dir holds up-to-date train/test .beton files for dataset `name`.

    A read-only data_dir is fine once it holds them (a shared, prepared data folder), with or
    without the source they were made from. Reading a prepared folder takes no lock (every
    rank of a run does it at once); processes that must write there take turns (see
    preparing).
    """
    numba_settings_checked()  # FFCV's compiler would fail on them after the source is written
    check_data_dir(data_dir, writing=False)
    source = Path(data_dir) / cifar.source_name(name, Path(data_dir), synthetic_size)
    paths = beton_paths(name, Path(data_dir), source.name)
    why = ""  # why .beton files that are there cannot be used
    sourceless = False  # they are there without the source they would be rebuilt from
    if all(beton.sidecar(p).is_file() for p in paths.values()):
        # read from the python folder when it is there; CIFAR's archive or an image folder's
        # pictures would have to be written out first, which a shared read-only folder
        # refuses (an image folder's .beton names come from its pictures: these are of them)
        if source.is_dir():
            ready, why = _reuse(name, Path(data_dir), synthetic_size, paths)
        else:  # .beton files copied without their source, as FFCV users do
            ready, why = _without_source(name, source, paths)
            sourceless = True
        if ready is not None:
            return ready
    check_data_dir(data_dir, why=why)  # something must be written there
    # a second writer waits, then finds the first's files ready; a data folder this call made
    # goes again when the call fails leaving it empty (a failed download, a Ctrl-C)
    with removed_on_failure(missing_folders(Path(data_dir))), preparing(Path(data_dir)):
        sweep_stale(Path(data_dir), source.name)
        try:
            return _convert(name, Path(data_dir), synthetic_size, workers)
        except DataError as error:
            if not sourceless:
                raise
            # else the error (a failed download, offline) would not say why the source of
            # prepared files was fetched at all; a download's advice kept apart, as it was
            said = f"{why}; making the .beton files again from their source failed: "
            if isinstance(error, Unfetched):
                raise Unfetched(said + error.failure, error.place) from error
            raise DataError(said + str(error)) from error


def beton_paths(name: str, data_dir: Path, source: str) -> dict[str, Path]:
    """Where dataset `name`, read from the python folder `source`, is converted to: named
    after the dataset (CIFAR), or after the folder (one per synthetic size, one per state of
    an image folder)."""
    tag = name if name in LAYOUTS else source
    return {split: data_dir / beton.file_name(tag, split) for split in SPLITS}


def sweep_stale(data_dir: Path, source: str) -> None:
    """Remove what a writer killed outright (SIGKILL, the OOM killer: no cleanup ran) left in
    data_dir: a partial download, an extraction's staging folder, the `source` folder's
    staging folder. Called holding the lock: no live writer's files are among them."""
    for pattern in (f"{part_prefix('*.tar.gz')}*{PART_SUFFIX}", f"{EXTRACT_PREFIX}*",
                    f"{staging_prefix(source)}*"):
        for stale in data_dir.glob(pattern):
            _remove(stale)


def _remove(path: Path) -> None:
    """Remove a file, or a folder with what it holds; a link itself, not what it leads to
    (rmtree refuses a link, and its ignore_errors would have kept it)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def preparing(data_dir: Path) -> AbstractContextManager[None]:
    """The lock on data_dir/.prepare.lock (data_dir made if missing) held while data is
    written there: a second process preparing the same folder waits for the first, then
    reuses what it wrote, instead of writing the same files and sweeping the first's
    temporaries as stale."""
    data_dir.mkdir(parents=True, exist_ok=True)
    lock = data_dir / ".prepare.lock"
    return waiting_lock(lock, lambda: log.warning(
        f"notice: waiting for another process preparing {data_dir} to finish ({lock})"))


def _prepared(data: cifar.CifarData, paths: dict[str, Path], train: beton.BetonInfo) -> Prepared:
    """What prepare returns for data written to paths, normalized with train's statistics."""
    return Prepared(data.name, data.classes, paths["train"], paths["test"], train.mean,
                    train.std, data.source)


def _reuse(name: str, data_dir: Path, synthetic_size: tuple[int, int],
           paths: dict[str, Path]) -> tuple[Prepared | None, str]:
    """The .beton files at paths when both hold dataset `name` as it is now (the test split
    normalized with the training split's statistics); else None, and why."""
    data = cifar.load(name, data_dir, synthetic_size)
    infos: dict[str, beton.BetonInfo] = {}
    for split, path in paths.items():
        stats = (infos["train"].mean, infos["train"].std) if infos else None
        info, why, _ = beton.cached(path, getattr(data, split), data.classes, stats)
        if info is None:
            return None, f"{path} {why}" if why else f"{path.name} no longer matches {data.source}"
        infos[split] = info
    return _prepared(data, paths, infos["train"]), ""


def _without_source(name: str, source: Path, paths: dict[str, Path]) -> tuple[Prepared | None,
                                                                               str]:
    """The .beton files at paths on their own, their source gone: when both are whole (by
    their sidecars' size and hash) and of one dataset (same classes, test normalized with
    train's statistics); else None, and why (the source is then fetched or made again)."""
    infos: dict[str, beton.BetonInfo] = {}
    for split, path in paths.items():
        info, why = beton.sidecar_state(path)
        if info is None:
            return None, f"{path} {why}"
        if damaged := beton.damage(path, info):
            return None, f"{path} is damaged ({damaged})"
        infos[split] = info
    train, test = infos["train"], infos["test"]
    if (test.classes, test.mean, test.std) != (train.classes, train.mean, train.std):
        return None, f"{paths['train'].name} and {paths['test'].name} were not made together"
    return Prepared(name, train.classes, paths["train"], paths["test"], train.mean, train.std,
                    source), ""


def _convert(name: str, data_dir: Path, synthetic_size: tuple[int, int],
             workers: int | None) -> Prepared:
    """prepare's work: load dataset `name`, write its .beton files (or reuse them, up to date)."""
    data = cifar.load(name, data_dir, synthetic_size)
    # named by what was read: pictures changed since prepare named them (while it waited for
    # the lock, say) would otherwise be written under the earlier state's name, then swept
    paths = beton_paths(name, data_dir, data.source.name)
    # writer processes beyond the cores only cost memory, and a page of disk space each
    workers = min(workers, default_workers()) if workers else default_workers()
    train = beton.write(paths["train"], data.train, data.classes, workers=workers)
    # the test split is normalized with the training statistics, as the model will see it
    beton.write(paths["test"], data.test, data.classes, (train.mean, train.std), workers)
    if name == "folder":
        sweep_older_conversions(data_dir, data.source.name)
    return _prepared(data, paths, train)


def sweep_older_conversions(root: Path, current: str) -> None:
    """Remove what earlier states of the image folder `root` were converted into (their python
    folders and .beton files, ours by name: folder-<16 hex digits>), keeping `current`'s:
    each change to the pictures would otherwise leave a whole copy of the data behind. Called
    holding the lock, once the current files are written."""
    for old in root.iterdir():  # the python folder itself, or a .beton or sidecar of its
        tag = beton.tag_of(old.name.removesuffix(beton.SIDECAR_SUFFIX)) or old.name
        if not re.fullmatch(IMAGE_FOLDER_PATTERN, tag) or tag == current:
            continue
        _remove(old)
