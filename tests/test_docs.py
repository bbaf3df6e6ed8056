"""The documentation, checked: every relative link in README.md, ARCHITECTURE.md and docs/*.md resolves
(to a file or folder, and to a heading where it names an anchor of a Markdown page), every `make TARGET`
they show is a target of the Makefile, commands are written so that they run from a fresh clone
(`.venv/bin/python`, `.venv/bin/catcurate`, never a bare `python` or `spark-submit`), the README stays
short and links every page of docs/.

Reads text only (nothing is imported or run), so it takes a fraction of a second."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 220
# the pages of docs/, one per concern (README's "where to read more" links each)
DOC_PAGES = ("filter.md", "text-spotting.md", "bad-input.md", "redecide.md", "webdataset-datacomp.md",
             "distillation.md", "training.md", "evaluation.md", "benchmarks.md", "cluster-storage.md",
             "limits.md")
# commands that a fresh clone does not have on PATH (they live in .venv/bin after `make setup`)
NOT_ON_PATH = ("python", "python3", "spark-submit", "torchrun", "catcurate", "pytest", "pip")
IN_PROSE = tuple(c for c in NOT_ON_PATH if c != "catcurate")   # prose may name `catcurate filter`


def doc_files() -> list[Path]:
    return [ROOT / "README.md", ROOT / "ARCHITECTURE.md", *sorted((ROOT / "docs").glob("*.md"))]


def split_code(text: str) -> tuple[str, list[str]]:
    """(prose with code blocks blanked, code lines): fenced blocks and indented blocks (4 spaces or a
    tab after a blank line) are code; prose keeps its line count so errors can name lines."""
    prose, code = [], []
    fence, indented, prev_blank = None, False, True
    for line in text.split("\n"):
        stripped = line.lstrip()
        if fence:
            code.append(line)
            prose.append("")
            if stripped.startswith(fence):
                fence = None
            continue
        if stripped.startswith(("```", "~~~")):
            fence = stripped[:3]
            prose.append("")
            continue
        is_indented = line.startswith(("    ", "\t")) and bool(stripped)
        indented = is_indented and (prev_blank or indented)
        if indented:
            code.append(line)
            prose.append("")
        else:
            prose.append(line)
        prev_blank = not stripped
    return "\n".join(prose), code


SPAN = re.compile(r"(`+)((?:(?!\n[ \t]*\n)[\s\S])+?)\1")   # a code span may wrap, not across a blank line


def code_spans(prose: str) -> list[str]:
    return [m.group(2) for m in SPAN.finditer(prose)]


LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
REF_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$", re.M)


def links(text: str) -> list[tuple[int, str]]:
    """(line number, target) of every Markdown link and image outside code."""
    prose, _ = split_code(text)
    prose = SPAN.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), prose)   # links in code spans are text
    found = []
    for rx in (LINK, REF_LINK):
        for m in rx.finditer(prose):
            found.append((prose.count("\n", 0, m.start()) + 1, m.group(1)))
    return found


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, markup and punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)      # a link's text stays
    text = text.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    prose, _ = split_code(path.read_text())
    seen, out = {}, set()
    for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", prose, re.M):
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def broken_links(path: Path) -> list[str]:
    bad = []
    for line, target in links(path.read_text()):
        if not target or re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):   # http(s):, mailto:, ...
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}:{line}"
        if not dest.exists():
            bad.append(f"{where}: {target} (no such file)")
        elif anchor and dest.is_file() and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{where}: {target} (no heading with anchor #{anchor} in {dest.name})")
    return bad


def make_targets(makefile: Path) -> set[str]:
    targets = set()
    for line in makefile.read_text().split("\n"):
        if line.startswith(".PHONY:"):
            targets.update(line.split(":", 1)[1].split())
            continue
        m = re.match(r"^([A-Za-z0-9_.-]+(?:[ \t]+[A-Za-z0-9_.-]+)*)[ \t]*::?(?!=)", line)
        if m and not line.startswith(("export ", "override ", "define ")):
            targets.update(m.group(1).split())
    return targets


def named_make_targets(text: str) -> list[str]:
    """Targets of every `make ...` shown in code spans and code blocks (variables and options skipped)."""
    prose, code = split_code(text)
    names = []
    for snippet in code_spans(prose) + code:
        for m in re.finditer(r"(?<![\w/$.-])make((?:[ \t]+[^\s|;&#`]+)+)", snippet):
            for word in m.group(1).split():
                if "=" in word or word.startswith("-") or word.startswith("["):
                    continue
                names.append(word.rstrip(".,:)"))
                break
    return names


def bare_commands(text: str) -> list[str]:
    """Commands in code that a fresh clone cannot run: a bare `python`, `spark-submit`, ... (env
    assignments in front skipped); `.venv/bin/...` is the way to write them."""
    prose, code = split_code(text)
    bad = []
    for snippets, commands in ((code_spans(prose), IN_PROSE), (code, NOT_ON_PATH)):
        for snippet in snippets:
            for part in re.split(r"[|;&]+", snippet):
                words = part.split()
                while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
                    words = words[1:]
                if len(words) >= 2 and words[0] in commands:
                    bad.append(snippet.strip())
    return bad


def test_every_relative_link_resolves():
    bad = [b for path in doc_files() for b in broken_links(path)]
    assert not bad, "broken links:\n" + "\n".join(bad)


def test_every_make_target_shown_exists():
    defined = make_targets(ROOT / "Makefile")
    assert {"filter", "test", "redecide"} <= defined, f"Makefile targets not parsed: {sorted(defined)}"
    bad = []
    for path in [ROOT / "README.md", ROOT / "ARCHITECTURE.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for name in named_make_targets(path.read_text()):
            if name not in defined:
                bad.append(f"{path.relative_to(ROOT)}: make {name}")
    assert not bad, "make targets that the Makefile does not define:\n" + "\n".join(bad)


def test_commands_run_from_a_fresh_clone():
    bad = [f"{p.relative_to(ROOT)}: {c}" for p in doc_files() for c in bare_commands(p.read_text())]
    assert not bad, ("commands not on a fresh clone's PATH (write .venv/bin/python, .venv/bin/catcurate, "
                     ".venv/bin/spark-submit):\n" + "\n".join(bad))


def test_readme_is_short_and_links_every_page():
    text = (ROOT / "README.md").read_text()
    n = len(text.splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines (at most {README_MAX_LINES}): move detail to docs/"
    linked = {(ROOT / t.partition("#")[0]).resolve() for _, t in links(text)}
    pages = {(ROOT / "docs" / p).resolve() for p in DOC_PAGES} | set((ROOT / "docs").glob("*.md"))
    missing = sorted(str(p.relative_to(ROOT)) for p in pages if p.resolve() not in linked or not p.exists())
    assert not missing, "docs pages missing or not linked from README.md: " + ", ".join(missing)


def test_quick_start_is_the_two_commands():
    _, code = split_code((ROOT / "README.md").read_text())
    commands = [line.split("#")[0].strip() for line in code]
    assert "make filter" in commands and "make test" in commands


def test_the_checkers_find_planted_mistakes(tmp_path):
    """The checkers themselves: a planted broken link, a missing anchor, an unknown make target and a
    bare command are found; good ones, and links or commands inside code, pass."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text("# A page\n\n## Heading `two`, here\n")
    doc = tmp_path / "doc.md"
    doc.write_text(
        "# T\n\nSee [page](docs/page.md), [h](docs/page.md#heading-two-here), [self](#t),\n"
        "[web](https://example.com/x), [mail](mailto:a@b.c) and ![img](docs/page.md).\n"
        "Broken: [gone](docs/missing.md) and [anchor](docs/page.md#nope).\n"
        "[ref]: docs/also-missing.md\n\n"
        "`[not a link](nowhere.md)`\n\n    [code](nowhere.md)\n    make filter OUTPUT=x\n"
        "    python -m thing\n    catcurate filter\n\nRun `make nosuch` or `make OUTPUT=a test` or `.venv/bin/python -m ok`,\n"
        "`catcurate filter` (a name), `PYTHONPATH=. python x.py`.\n")
    bad = broken_links(doc)
    assert len(bad) == 3, bad
    assert any("docs/missing.md" in b for b in bad) and any("#nope" in b for b in bad)
    assert any("also-missing" in b for b in bad)
    assert named_make_targets(doc.read_text()) == ["nosuch", "test", "filter"]
    assert bare_commands(doc.read_text()) == ["PYTHONPATH=. python x.py", "python -m thing", "catcurate filter"]
    mk = tmp_path / "Makefile"
    mk.write_text("SHELL := /bin/bash\nX ?= 1\nexport Y := 2\n.PHONY: a b\na: dep\n\t@echo c: d\n"
                  "$(V)/x: y\nlast other: ; true\n")
    assert make_targets(mk) == {"a", "b", "last", "other"}
    assert slug("Output layout of the filter (OUTPUT/)") == "output-layout-of-the-filter-output"
    assert slug("Re-deciding (`make redecide`, `jobs/redecide.py`)") == "re-deciding-make-redecide-jobsredecidepy"


def test_architecture_maps_every_file():
    """ARCHITECTURE.md names every product source file (one line each), so the map cannot fall behind."""
    import subprocess
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.py"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split()
    arch = (ROOT / "ARCHITECTURE.md").read_text()
    product = [f for f in listed if f.split("/")[0] in ("schemas", "pipeline", "jobs", "model_training", "experiments",
                                                        "bench", "catcurate", "scripts")
               and not f.endswith("__init__.py") and not f.endswith("__main__.py") and (ROOT / f).is_file()]
    assert len(product) > 40
    missing = [f for f in product if f"`{f}`" not in arch and f not in arch]
    assert not missing, f"ARCHITECTURE.md does not map: {missing}"
