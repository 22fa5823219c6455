"""The docs stay true: every command README.md, BENCHMARKS.md and docs/*.md show is accepted by
that command's own parser, every option and make target they name exists, every file they
point to (a raw log, a picture) is in the repository, every BENCHMARKS.md row names its device
and commit and its raw log holds its figures, docs/training.md's option table gives the
defaults a run takes, and docs/gpu.md's table of GPU steps is the suite's, time limits
included."""

from __future__ import annotations

import contextlib
import importlib
import io
import re
import shlex
from collections.abc import Iterator
from pathlib import Path

from conftest import MAKE, ROOT

DOCS = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]
SCRIPTS = {  # how the docs start a command -> its module, whose main() parses, then run_main()
    "engine/train.py": "engine.train", "loaders/prepare.py": "loaders.prepare",
    "tools/report.py": "tools.report", "tools/bench.py": "tools.bench",
    "tools/lr_find.py": "tools.lr_find", "tools/compare.py": "tools.compare",
    "tools/predict.py": "tools.predict", "tools/export.py": "tools.export",
    "tools/gpu_suite.sh": "tools.gpu_suite"}
# options the docs give to other programs: accelerate launch, torchrun, pip, torchvision's
# reference script (what the step schedule lacks); and "--no-...",
# the docs' name for the off switch of every on/off option
OTHERS = {"--cpu", "--machine_rank", "--main_process_ip", "--main_process_port",
          "--mpirun_hostfile", "--multi_gpu", "--num_machines", "--num_processes",
          "--master_addr", "--nnodes", "--node_rank", "--nproc_per_node", "--no-deps",
          "--no-index", "--target", "--no-", "--mixed_precision", "--dynamo_backend",
          "--logdir", "--master_port",
          "--max-restarts", "--max_restarts", "--rdzv-conf", "--lr-step-size", "--lr-gamma"}
OPTION = re.compile(r"(?<![\w-])--[a-z][\w-]*")
LINK = re.compile(r"\]\(([^)\s]+)\)")  # a markdown link's target


def code(doc: Path) -> Iterator[tuple[int, str, bool]]:
    """(line number, text, fenced) of each command-like piece of a doc: a fenced block's lines
    (a line ending in a backslash joined with the next) and every inline `code` span."""
    fenced, pending = False, ""
    for number, line in enumerate(doc.read_text().splitlines(), 1):
        if line.startswith("```"):
            fenced = not fenced
        elif fenced:
            pending += line
            if pending.endswith("\\"):
                pending = pending[:-1]
                continue
            yield number, pending, True
            pending = ""
        else:
            yield from ((number, span, False) for span in re.findall(r"`([^`]+)`", line))


def commands(docs: list[Path] = DOCS) -> list[tuple[str, str, list[str]]]:
    """(where, script, its arguments) of every command of ours the docs show, directly or
    through a make target that passes ARGS on."""
    found = []
    for doc in docs:
        for number, text, fenced in code(doc):
            where = f"{doc.name}:{number}: {text.strip()}"
            try:
                words = shlex.split(text, comments=True)
            except ValueError:  # prose in backticks, not a command
                continue
            if words[:1] == ["make"] and len(words) > 1 and words[1] in MAKE:
                assigned = dict(w.split("=", 1) for w in words[2:] if "=" in w)
                args = shlex.split(assigned.get("STEP", "")) + shlex.split(assigned.get("ARGS", ""))
                found.append((where, MAKE[words[1]], args))
                continue
            for i, word in enumerate(words):
                script = next((s for s in SCRIPTS if word == s or word.endswith("/" + s)), None)
                if script is not None:
                    if fenced or words[i + 1:]:  # else a script named in a sentence
                        found.append((where, script, words[i + 1:]))
                    break
    return found


def parse_only(script: str, args: list[str], monkeypatch) -> tuple[int | None, str]:
    """The script's main() on args with its work left out (run_main returns 0 at once): its
    exit code and what its parser printed."""
    module = importlib.import_module(SCRIPTS[script])
    monkeypatch.setattr(module, "run_main", lambda body: 0)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = module.main(args)
        except SystemExit as exit:
            code = exit.code
    return code, out.getvalue() + err.getvalue()


def refused(shown: list[tuple[str, str, list[str]]], monkeypatch) -> list[str]:
    """Where each of the `shown` commands its parser refuses is, with its exit code and the
    parser's last words."""
    said = []
    for where, script, args in shown:
        code, output = parse_only(script, args, monkeypatch)
        if code != 0:
            said.append(f"{where}\n    -> exit {code}: {output.strip()[-300:]}")
    return said


def test_every_command_the_docs_show_is_accepted_by_its_parser(monkeypatch):
    shown = commands()
    assert {script for _, script, _ in shown} == set(SCRIPTS)  # the search finds every one
    wrong = refused(shown, monkeypatch)
    assert not wrong, "\n".join(wrong)


def test_a_command_with_an_unknown_option_is_found_out(monkeypatch):
    """parse_only is a real check: a misspelt option or a value outside its choices fails."""
    assert parse_only("engine/train.py", ["--epocs", "3"], monkeypatch)[0] == 2
    assert parse_only("tools/bench.py", ["--sections", "loader"], monkeypatch)[0] == 2
    assert parse_only("tools/gpu_suite.sh", ["train", "bench"], monkeypatch)[0] == 0


def unknown_options(docs: list[Path], monkeypatch) -> list[str]:
    """Each option the docs name, in commands or prose, that is neither one of our commands'
    (read from their --help) nor in OTHERS."""
    ours = set()
    for script in SCRIPTS:
        code, usage = parse_only(script, ["--help"], monkeypatch)
        assert code == 0 and usage.startswith("usage:"), (script, usage[:300])
        ours |= set(OPTION.findall(usage))
    return sorted({f"{doc.name}: {option}" for doc in docs
                   for option in OPTION.findall(doc.read_text()) if option not in ours | OTHERS})


def test_every_option_the_docs_name_is_one_of_a_command(monkeypatch):
    """Options named in the prose too (the option table, the notes): each is one of our
    commands' or one the docs give to accelerate, torchrun or pip."""
    unknown = unknown_options(DOCS, monkeypatch)
    assert not unknown, unknown


def test_every_make_target_the_docs_name_is_in_the_makefile():
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.MULTILINE))
    named = {(doc.name, word) for doc in DOCS for _, text, _ in code(doc)
             for word in re.findall(r"^\s*make ([\w-]+)", text)}
    assert {"train", "test"} <= {target for _, target in named}
    assert not {(doc, target) for doc, target in named if target not in targets}


def files_named(doc: Path) -> Iterator[tuple[str, Path]]:
    """(as written, path) of each relative link and each benchmarks/ path in a doc; a path
    with a <placeholder> is a pattern for the reader, not a file."""
    text = doc.read_text()
    for link in LINK.findall(text):
        if not re.match(r"[a-z]+:|#", link):
            yield link, doc.parent / link.split("#")[0]
    for path in re.findall(r"(?<![\w/.:<-])(benchmarks/[\w./<>-]*\w)", text):
        if "<" not in path:
            yield path, ROOT / path


def missing_files(docs: list[Path]) -> list[tuple[str, str]]:
    """(doc, as written) of each file the docs point to that is not there."""
    return sorted({(doc.name, written) for doc in docs for written, path in files_named(doc)
                   if not path.exists()})


def test_every_file_the_docs_point_to_exists():
    named = [path for doc in DOCS for _, path in files_named(doc)]
    assert len(named) > 20  # the raw logs of the figures, the pictures
    missing = missing_files(DOCS)
    assert not missing, missing


def test_the_layout_page_names_every_module():
    """docs/layout.md, which README points to for every module: a module added without a line
    there (common/wording.py was) leaves a reader of the page without it."""
    layout = (ROOT / "docs" / "layout.md").read_text()
    # its module tree: a folder's part from the line it begins (`engine/   config.py ...`)
    parts = {part.split("/")[0]: part for part in re.split(r"^(?=\w+/ )", layout, flags=re.M)}
    modules = [path for folder in ("engine", "loaders", "tools", "common")
               for path in sorted((ROOT / folder).iterdir())
               if path.suffix in (".py", ".sh") and path.name != "__init__.py"]
    assert len(modules) > 80
    assert [f"{m.parent.name}/{m.name}" for m in modules
            if not re.search(rf"\b{re.escape(m.name)}\b", parts.get(m.parent.name, ""))] == []


def doc_table(page: str, header: str) -> str:
    """The table of docs/`page` whose first line is `header`, up to the blank line that ends
    it."""
    text = (ROOT / "docs" / page).read_text()
    return text[text.index(header):].split("\n\n")[0]


def test_the_gpu_steps_table_and_the_makefile_list_the_suites_steps_and_limits():
    """docs/gpu.md's table of `make gpu` steps: the suite's steps in the order `all` runs them, each
    with the time limit tools/gpu_steps.py gives it (whole minutes: a limit of 150 s is not "at
    most 2 minutes"); the Makefile's comment in the same order; and every step, in both, ends
    within the minutes they say (STEP_LIMIT_S)."""
    from tools.gpu_steps import LIMITS, STEP_LIMIT_S, STEPS

    block = doc_table("gpu.md", "| `STEP=` | what runs |")
    table = dict(re.findall(r"^\| `([\w-]+)` \|(.*)\|$", block, re.MULTILINE))
    assert list(table) == list(STEPS)  # the groups' row, `tests`, `bench`, `all`, aside
    for step, text in table.items():
        limits = [60 * int(m) for m in re.findall(r"at most (\d+) minutes", text)]
        assert limits == ([LIMITS[step]] if step in LIMITS else []), step
    makefile = (ROOT / "Makefile").read_text()
    make = re.search(r"STEP= one or more of ([\w\s#-]+?), or the groups", makefile)
    assert make.group(1).replace("#", " ").split() == list(STEPS)
    for pattern, text in ((r"in steps that each end within (\d+) minutes",
                           (ROOT / "docs" / "gpu.md").read_text()),
                          (r"each step under (\d+) minutes", makefile)):
        said = re.search(pattern, text)
        assert said and 60 * int(said.group(1)) > STEP_LIMIT_S, (pattern, STEP_LIMIT_S)


def test_the_option_tables_defaults_are_what_a_run_takes():
    """docs/training.md's table of engine/train.py's options: each default is the parsed
    config's (with "on GPU" and "on CPU", "for CUDA", the config resolved for each)."""
    from engine.config import resolve
    from engine.options import parse

    cfg = parse([]).cfg
    machines = {"GPU": resolve(cfg, cuda=True), "CPU": resolve(cfg, cuda=False)}
    block = doc_table("training.md", "| option | default | |")
    checked = []
    for options, defaults in re.findall(r"^\| (`--[^|]*) \|([^|]*)\|", block, re.MULTILINE):
        names = [n.replace("-", "_") for n in re.findall(r"`--([\w-]+)", options)]
        if not defaults.strip():  # --out, --resume, --seed, ...: nothing said
            continue
        values = [v.strip("`") for v in defaults.strip().split(", ")]
        if len(names) == 1 and len(values) == 2:  # "bf16 on GPU, fp32 on CPU"
            for value in values:
                want, machine = re.fullmatch(r"(\S+) on (GPU|CPU)", value).groups()
                assert getattr(machines[machine], names[0]) == want, (names[0], value)
            checked.append(names[0])
            continue
        for name, value in zip(names, values, strict=True):
            if value == "on for CUDA":
                assert (getattr(machines["GPU"], name), getattr(machines["CPU"], name)) == (
                    True, False), name
            else:
                have = getattr(cfg, name)
                want = {"on": True, "off": False}.get(value, value)
                if isinstance(have, int | float) and not isinstance(have, bool):
                    want = type(have)(want)  # "5e-4" is 0.0005
                assert have == want, name
            checked.append(name)
    assert {"epochs", "batch_size", "lr", "loader", "precision", "compile"} <= set(checked)


NUMBER = re.compile(r"(?<![\w.])\d[\d,]*(?:\.\d+)?")  # 186,047.9, 0.000721, 13.5


def benchmark_rows(doc: Path = ROOT / "BENCHMARKS.md") -> Iterator[tuple[dict[str, str], str]]:
    """({header: cell}, the line) of each row of BENCHMARKS.md's tables of measured figures:
    those with a device and a commit column."""
    header = None
    for line in doc.read_text().splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if header is None:
            header = cells
        elif not set("".join(cells)) <= set("-: ") and {"device", "commit"} <= set(header):
            yield dict(zip(header, cells, strict=True)), line


def unlogged(doc: Path) -> list[tuple[str, str]]:
    """(what is wrong, the line) of each row of `doc`'s tables of measured figures that lacks a
    device, a commit or a raw log that is there, whose commit (with -dirty where it ran with
    uncommitted changes) its log or the log's .json twin does not record, or one of whose
    figures (the number, commas aside) is in neither; the 'what' column only describes."""
    wrong = []
    for row, line in benchmark_rows(doc):
        logs = [doc.parent / link.split("#")[0] for link in LINK.findall(line)]
        if not (row["device"] and row["commit"] and logs and all(p.is_file() for p in logs)):
            wrong.append(("no device, commit or raw log", line))
            continue
        text = "".join(path.read_text() for log in logs
                       for path in (log, log.with_suffix(".json")) if path.is_file())
        commit = row["commit"].removesuffix("-dirty")
        # a row copied from another run's, or one that hides the uncommitted changes it ran with
        dirty = re.search(re.escape(commit) + r"[0-9a-f]*-dirty", text) is not None
        if commit not in text or dirty != row["commit"].endswith("-dirty"):
            wrong.append((f"commit {row['commit']}", line))
        logged = {n.replace(",", "") for n in NUMBER.findall(text)}
        for column, cell in row.items():
            if column not in ("device", "commit", "what", "raw log"):
                figures = NUMBER.findall(re.sub(r"\[[^]]*\]\([^)]*\)", "", cell))
                wrong += [(f"{column}: {figure}", line) for figure in figures
                          if figure.replace(",", "") not in logged]
    return wrong


def test_every_benchmarks_row_names_its_device_and_commit_and_its_log_holds_its_figures():
    """Each row: a device, a commit, a raw log linked that records that commit (not another
    run's) and holds every figure of the row."""
    assert len(list(benchmark_rows())) > 30
    wrong = unlogged(ROOT / "BENCHMARKS.md")
    assert not wrong, wrong


BROKEN_PAGE = """# A page with one of each mistake

Run `tools/report.py --bogus RUN`; `tools/compare.py` alone is a script named in a sentence,
and `--no-cudnn-benchmarks` a misspelt switch. See [the log](logs/gone.log) and
benchmarks/results/gone.log.

```bash
python tools/bench.py --device cpu \\
    --epocs 4
python tools/lr_find.py
make gpu STEP=trains
make bench ARGS="--quik"
```

| what | device | commit | measured | raw log |
| --- | --- | --- | --- | --- |
| an epoch | cpu | 0123456789ab | 1.25 s, 3,001 images | [run.log](run.log) |
| a row copied from another run | cpu | ba9876543210 | 3,001 images | [run.log](run.log) |
| a row without its log | cpu | 0123456789ab | 3,001 images | [gone.log](gone.log) |
| uncommitted changes unsaid | cpu | fedcba987654 | 3,001 images | [dirty.log](dirty.log) |
"""


def test_the_checks_find_each_mistake_of_a_broken_page(tmp_path, monkeypatch):
    """The checks above pass on the real docs; here each finds its mistake in a page that has
    one of each: a continued line's options, a make target's STEP and ARGS, an inline command
    and a bare one in a block are all read (a search that dropped any passed the real docs
    unseen), and a missing file, a figure or a commit its log lacks (or has with -dirty) are
    named."""
    doc = tmp_path / "page.md"
    doc.write_text(BROKEN_PAGE)
    (tmp_path / "run.log").write_text("commit: 0123456789abcdef\nepoch: 1.5 s, 3001 images\n")
    (tmp_path / "dirty.log").write_text("commit: fedcba9876543210-dirty\n3001 images\n")
    shown = commands([doc])
    assert [(script, args) for _, script, args in shown] == [
        ("tools/report.py", ["--bogus", "RUN"]),
        ("tools/bench.py", ["--device", "cpu", "--epocs", "4"]),
        ("tools/lr_find.py", []), ("tools/gpu_suite.sh", ["trains"]),
        ("tools/bench.py", ["--quik"])]
    assert [said.split("\n")[0] for said in refused(shown, monkeypatch)] == [
        where for where, script, _ in shown if script != "tools/lr_find.py"]
    assert unknown_options([doc], monkeypatch) == [
        f"page.md: {option}" for option in ("--bogus", "--epocs", "--no-cudnn-benchmarks",
                                            "--quik")]
    assert missing_files([doc]) == [("page.md", written) for written in (
        "benchmarks/results/gone.log", "gone.log", "logs/gone.log")]
    rows = BROKEN_PAGE.splitlines()[-4:]
    assert unlogged(doc) == [("measured: 1.25", rows[0]), ("commit ba9876543210", rows[1]),
                             ("no device, commit or raw log", rows[2]),
                             ("commit fedcba987654", rows[3])]
