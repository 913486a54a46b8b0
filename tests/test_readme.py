"""The README stays a page a newcomer reads: short, with the Quick start, and every flag and link it
(or a docs page) names is real.

The flags are checked against the scripts' own argparse parsers, built in this process: each
script's ``main(["--help"])`` runs until its parser would parse, where the parser is taken instead
(no subprocess, no help text to scrape, and no dependence on how each script names its builder).
"""
import argparse
import functools
import importlib.util
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MAX_README_LINES = 300

# The scripts a user runs; a flag the docs name without naming its script must belong to one of
# them (or to a script the docs run with flags elsewhere, e.g. a benchmark).
SCRIPTS = ("build_lmdb.py", "train_unet.py", "train_segnet.py", "pretrain_unet.py", "inference.py",
           "export_bioimageio.py", "demo.py", "demo_data.py")

# Flags of other programs that the docs show in their commands: sbatch's and tensorboard's.
FOREIGN_FLAGS = {"--export", "--nodes", "--signal", "--gres", "--cpus-per-task", "--logdir", "--array", "--requeue",
                 "--open-mode", "--shm-size"}

# A backtick opens or closes a code span; a script is any path ending in .py or .sh; a flag is two
# dashes and a letter not glued to a word or another dash (so "and---reader_count" in a heading
# anchor or "----" in a table rule is not one).
TOKEN = re.compile(r"(?P<tick>`)|(?P<script>(?<![\w./-])(?:[\w-]+/)*[\w-]+\.(?:py|sh))(?![\w.])"
                   r"|(?P<flag>(?<![\w-])--[A-Za-z][\w-]*)")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
SLURM_SCRIPT = ROOT / "launch_train_sbatch.sh"
SLURM_SCRIPTS = (SLURM_SCRIPT, ROOT / "launch_inference_sbatch.sh")
# launch_train_sbatch.sh takes environment variables, not flags: the docs set them per job as
# `--export=ALL,NAME=value,...` and list them in the first column of docs/slurm.md's settings table.
EXPORTED = re.compile(r"--export=ALL,([\w=,./:-]+)")
SETTING_ROW = re.compile(r"^\| (`[A-Z_]+`(?:, `[A-Z_]+`)*) \|", flags=re.M)


def doc_files():
    """README.md, every docs/*.md and benchmarks/README.md (those present)."""
    files = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]
    return [path for path in files if path.is_file()]


def logical_lines(text):
    """(line number, line) with shell continuations (a trailing backslash) joined to the next line."""
    joined, start, pending = [], None, ""
    for number, line in enumerate(text.splitlines(), 1):
        if start is None:
            start = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        joined.append((start, pending + line))
        start, pending = None, ""
    if pending:
        joined.append((start, pending))
    return joined


def flag_mentions(text):
    """Every flag of ``text`` as (line number, script or None, flag).

    A flag belongs to a script when it follows that script's name in the same command: the same
    code span (between backticks) or, outside spans, the same logical line (an indented command).
    Any backtick ends the attribution, so "`train_segnet.py` takes `--tile_size`" names no script.
    Link targets are dropped first: heading anchors such as "#readers-starvation-and---reader_count"
    are not flags.
    """
    mentions = []
    for number, line in logical_lines(text):
        line = LINK.sub("[]", line)
        script = None
        for match in TOKEN.finditer(line):
            if match.group("tick"):
                script = None
            elif match.group("script"):
                script = match.group("script")
            else:
                mentions.append((number, script, match.group("flag")))
    return mentions


class _ParserReached(BaseException):
    """Raised in place of parsing; a BaseException so no ``except Exception`` in a main() eats it."""

    def __init__(self, parser):
        super().__init__(parser.prog)
        self.parser = parser


def _load_script(path):
    if path.parent == ROOT:
        return importlib.import_module(path.stem)
    spec = importlib.util.spec_from_file_location(f"_readme_check_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.lru_cache(maxsize=None)
def script_options(script):
    """All option strings ("--tile_size", "-h", ...) of ``script`` (a path relative to the root).

    A shell script takes no flags (launch_train_sbatch.sh is configured by environment variables).
    """
    path = ROOT / script
    assert path.is_file(), f"the docs run {script}, which does not exist (from {ROOT})"
    if path.suffix == ".sh":
        return frozenset()
    module = _load_script(path)
    assert callable(getattr(module, "main", None)), (
        f"{script} has no main(argv): the docs name flags of it that this test cannot check")

    def reached(parser, args=None, namespace=None):
        raise _ParserReached(parser)

    original = argparse.ArgumentParser.parse_known_args
    argparse.ArgumentParser.parse_known_args = reached
    try:
        module.main(["--help"])
    except _ParserReached as caught:
        parser = caught.parser
    else:
        raise AssertionError(f"{script}: main(['--help']) returned without parsing its command line")
    finally:
        argparse.ArgumentParser.parse_known_args = original
    return frozenset(option for action in parser._actions for option in action.option_strings)


def unknown_flags(text, label):
    """The flags of ``text`` (a doc called ``label``) that no parser defines, as 'label:line: ...'."""
    mentions = flag_mentions(text)
    named_scripts = {script for _, script, _ in mentions if script}
    union = set().union(*(script_options(s) for s in SCRIPTS + tuple(sorted(named_scripts))))
    problems = []
    for number, script, flag in mentions:
        if script is not None:
            if flag not in script_options(script):
                problems.append(f"{label}:{number}: {flag} is not a flag of {script}")
        elif flag not in union and flag not in FOREIGN_FLAGS:
            problems.append(f"{label}:{number}: {flag} is a flag of none of {', '.join(SCRIPTS)}")
    return problems


def heading_anchors(text):
    """GitHub's anchors of the Markdown headings of ``text``."""
    anchors = set()
    for line in text.splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


def broken_links(text, folder, label):
    """Relative links of ``text`` (a doc called ``label`` in ``folder``) whose file, or heading
    anchor, does not exist."""
    problems = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        if not file_part:
            headings = heading_anchors(text)
        elif not (folder / file_part).exists():
            problems.append(f"{label}: link to {target}: {folder / file_part} does not exist")
            continue
        elif file_part.endswith(".md"):
            headings = heading_anchors((folder / file_part).read_text(encoding="utf-8"))
        else:
            continue
        if anchor and anchor not in headings:
            problems.append(f"{label}: link to {target}: no heading '#{anchor}' in {file_part or label}")
    return problems


def _doc(path):
    return path.read_text(encoding="utf-8"), str(path.relative_to(ROOT))


def slurm_settings():
    """The variables of the Slurm scripts' settings blocks (`: "${NAME:=default}"` lines)."""
    return {name for script in SLURM_SCRIPTS
            for name in re.findall(r'^: "\$\{([A-Z_]+):=', script.read_text(encoding="utf-8"), flags=re.M)}


def unknown_slurm_variables(text, label):
    """Variables the doc sets for launch_train_sbatch.sh (or lists as its settings) that it lacks."""
    named = [name for exports in EXPORTED.findall(text) for name in re.findall(r"(?:^|,)([A-Z_]+)=", exports)]
    named += [name for cell in SETTING_ROW.findall(text) for name in re.findall(r"`([A-Z_]+)`", cell)]
    known = slurm_settings()
    return [f"{label}: {name} is not a setting of {SLURM_SCRIPT.name}" for name in named if name not in known]


def test_readme_is_short_and_starts_with_the_two_commands():
    text = README.read_text(encoding="utf-8")
    lines = text.splitlines()
    assert len(lines) <= MAX_README_LINES, (
        f"README.md has {len(lines)} lines (at most {MAX_README_LINES}): move details to docs/")
    quick = re.search(r"^## Quick start\n(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    assert quick, "README.md has no '## Quick start' section"
    assert "make demo" in quick.group(1) and "make test" in quick.group(1), (
        "README.md's Quick start does not give both `make demo` and `make test`")


def test_every_flag_the_docs_name_exists():
    problems = [problem for path in doc_files() for problem in unknown_flags(*_doc(path))]
    assert not problems, "flags the docs name that no script defines:\n" + "\n".join(problems)


def test_every_relative_link_of_the_docs_exists():
    problems = []
    for path in doc_files():
        text, label = _doc(path)
        problems += broken_links(text, path.parent, label)
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_readme_links_every_docs_page():
    linked = {(ROOT / target.partition("#")[0]).resolve()
              for target in LINK.findall(README.read_text(encoding="utf-8")) if not re.match(r"[a-z]+:", target)}
    pages = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]
    missing = [str(page.relative_to(ROOT)) for page in pages if page.resolve() not in linked]
    assert len(pages) >= 2
    assert not missing, "README.md does not link these docs pages (add them to its Documentation list): " + ", ".join(missing)


def test_every_slurm_setting_the_docs_name_exists():
    assert {"TRAIN_DATABASE", "BATCH_SIZE", "REQUEUE"} <= slurm_settings()
    problems = [problem for path in doc_files() for problem in unknown_slurm_variables(*_doc(path))]
    assert not problems, "Slurm settings the docs name that the script lacks:\n" + "\n".join(problems)
    assert unknown_slurm_variables("sbatch --export=ALL,BATCH_SIZE=16,BATCH=2 x.sh\n| `NOPE` | 1 |", "probe") == [
        f"probe: BATCH is not a setting of {SLURM_SCRIPT.name}", f"probe: NOPE is not a setting of {SLURM_SCRIPT.name}"]


def test_the_checks_find_a_wrong_flag_its_script_and_a_broken_link(tmp_path):
    """The checks themselves can fail: a flag of the wrong script, an invented flag, a flag on a
    shell continuation line and a link to a missing heading or file are reported; a foreign flag,
    a correct flag and a good link are not."""
    (tmp_path / "recipe.md").write_text("# The recipe\n\n## What to change for your data\n")
    text = ("Run `inference.py --max_steps 3` and `--no_such_flag`.\n\n"
            "    python build_lmdb.py --image_folder a \\\n"
            "        --tta\n"
            "    sbatch --export=ALL,A=1 launch_train_sbatch.sh\n"
            "See [it](recipe.md#what-to-change-for-your-data), [it](recipe.md#nope), [it](gone.md)"
            " and `train_unet.py --loss`.\n")
    assert unknown_flags(text, "probe.md") == [
        "probe.md:1: --max_steps is not a flag of inference.py",
        "probe.md:1: --no_such_flag is a flag of none of " + ", ".join(SCRIPTS),
        "probe.md:3: --tta is not a flag of build_lmdb.py"]
    assert broken_links(text, tmp_path, "probe.md") == [
        "probe.md: link to recipe.md#nope: no heading '#nope' in recipe.md",
        f"probe.md: link to gone.md: {tmp_path / 'gone.md'} does not exist"]


@pytest.mark.parametrize("script", ["train_unet.py", "inference.py"])
def test_script_options_are_the_parsers_own(script):
    options = script_options(script)
    assert "--help" in options
    assert ("--train_database" in options) == (script == "train_unet.py")
    assert ("--tta" in options) == (script == "inference.py")
