"""docs/GUARANTEES.md maps each promise of README.md to the tests that check it. This keeps the
map true as tests are renamed, moved or removed: every cited node id must name a test function
that exists (read with ``ast``, nothing imported), every cited benchmark script must exist, every
row must cite something or say **not covered**, the summary lists must match the rows, and every
section of the README must have its section in the map. Milliseconds; no Spark."""
from __future__ import annotations

import ast
import re
from functools import lru_cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAP = REPO / "docs" / "GUARANTEES.md"
README = REPO / "README.md"

# README sections (``##``/``###`` headings) that make no promise of their own and so need no
# section in the map. None at present: even the Layout's rules for the code are mapped (to
# tests/test_layers.py). A new README section must be added to the map or, deliberately, here.
NO_PROMISE: frozenset[str] = frozenset()

# The map's own sections, which are no README heading.
MAP_ONLY = {"(Introduction, before Quick start)", "Not covered by any test", "Covered in part",
            "Benchmark figures only"}

ROW = re.compile(r"^\| ([A-Z]\d+) \|")
CODE_SPAN = re.compile(r"`([^`\n]+)`")
NODE_ID = re.compile(r"(tests/(?:[\w-]+/)*test_\w+\.py)::(?:(\w+)::)?(test\w*)(\[[^\]]+\])?")
BENCHMARK = re.compile(r"benchmarks/\w+\.py")
NOT_COVERED = "**not covered**"
PARTLY = "*not covered:*"


def headings(text: str) -> list[tuple[int, str, int]]:
    """(level, title, line index) of each ``##``/``###`` heading outside fenced code."""
    found, fenced = [], False
    for i, line in enumerate(text.splitlines()):
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (match := re.match(r"^(#{2,3}) (.+?)\s*$", line)):
            found.append((len(match.group(1)), match.group(2), i))
    return found


def sections(text: str) -> dict[str, list[str]]:
    """Each ``##``/``###`` heading's title -> its lines up to the next such heading."""
    lines = text.splitlines()
    marks = headings(text)
    bounds = [i for _, _, i in marks] + [len(lines)]
    return {title: lines[start + 1:bounds[n + 1]] for n, (_, title, start) in enumerate(marks)}


def rows() -> dict[str, str]:
    """Row id -> the whole table row, for every row of the map's tables."""
    out: dict[str, str] = {}
    for line in MAP.read_text(encoding="utf-8").splitlines():
        if match := ROW.match(line):
            assert match.group(1) not in out, f"row id {match.group(1)} is used twice in {MAP.name}"
            out[match.group(1)] = line
    return out


def spans(line: str) -> list[str]:
    return CODE_SPAN.findall(line)


def node_ids(line: str) -> list[re.Match]:
    return [m for s in spans(line) if (m := NODE_ID.fullmatch(s))]


def benchmarks(line: str) -> list[str]:
    return [s for s in spans(line) if BENCHMARK.fullmatch(s)]


@lru_cache(maxsize=None)
def definitions_in(path: str) -> tuple[frozenset[str], dict[str, frozenset[str]]] | None:
    """Module-level test functions and each class's test methods of ``path``; None if no such file."""
    file = REPO / path
    if not file.is_file():
        return None
    tree = ast.parse(file.read_text(encoding="utf-8"), filename=path)
    functions = (ast.FunctionDef, ast.AsyncFunctionDef)
    module = frozenset(n.name for n in tree.body if isinstance(n, functions))
    classes = {n.name: frozenset(m.name for m in n.body if isinstance(m, functions))
               for n in tree.body if isinstance(n, ast.ClassDef)}
    return module, classes


def test_every_cited_test_exists():
    cited, problems = 0, []
    for row_id, line in rows().items():
        for span in spans(line):
            if "::" in span and not NODE_ID.fullmatch(span):
                problems.append(f"{row_id}: `{span}` is not a node id like tests/x/test_y.py::[Class::]test_z[param]")
        for match in node_ids(line):
            cited += 1
            path, cls, name = match.group(1), match.group(2), match.group(3)
            found = definitions_in(path)
            if found is None:
                problems.append(f"{row_id}: {path} does not exist")
            elif cls is None and name not in found[0]:
                problems.append(f"{row_id}: {path} defines no module-level {name}")
            elif cls is not None and cls not in found[1]:
                problems.append(f"{row_id}: {path} defines no class {cls}")
            elif cls is not None and name not in found[1][cls]:
                problems.append(f"{row_id}: {path}::{cls} defines no {name}")
    assert cited > 100, f"only {cited} node ids found in {MAP.name}: has its format changed?"
    assert not problems, (f"{MAP.name} cites tests that are not there (renamed or removed? "
                          "fix the map in the same change):\n" + "\n".join(problems))


def test_every_cited_benchmark_exists():
    missing = [f"{row_id}: {script}" for row_id, line in rows().items() for script in benchmarks(line)
               if not (REPO / script).is_file()]
    assert not missing, "benchmark scripts cited but absent:\n" + "\n".join(missing)


def test_every_row_cites_a_test_or_a_benchmark_or_says_not_covered():
    problems = []
    for row_id, line in rows().items():
        cites = bool(node_ids(line) or benchmarks(line))
        if NOT_COVERED in line and node_ids(line):
            problems.append(f"{row_id}: says {NOT_COVERED} yet cites tests (use {PARTLY} for a gap)")
        elif NOT_COVERED not in line and not cites:
            problems.append(f"{row_id}: cites no test or benchmark and does not say {NOT_COVERED}")
    assert not problems, "\n".join(problems)


def listed(section: str) -> set[str]:
    body = sections(MAP.read_text(encoding="utf-8")).get(section)
    assert body is not None, f"{MAP.name} has no section '{section}'"
    return set(re.findall(r"\b([A-Z]\d+)\b", "\n".join(body)))


def test_the_summary_lists_are_the_rows_that_say_so():
    table = rows()
    uncovered = {i for i, line in table.items() if NOT_COVERED in line}
    partly = {i for i, line in table.items() if PARTLY in line}
    benchmark_only = {i for i, line in table.items() if benchmarks(line) and not node_ids(line)}
    assert listed("Not covered by any test") == uncovered
    assert listed("Covered in part") == partly
    assert listed("Benchmark figures only") == benchmark_only


def test_every_readme_section_has_its_section_in_the_map():
    readme = {title for _, title, _ in headings(README.read_text(encoding="utf-8"))}
    mapped = sections(MAP.read_text(encoding="utf-8"))
    assert readme, "no ## or ### heading found in README.md"
    assert not NO_PROMISE - readme, f"NO_PROMISE names sections README.md no longer has: {NO_PROMISE - readme}"
    missing = sorted(readme - NO_PROMISE - set(mapped))
    assert not missing, (f"README.md sections with no section in {MAP.name} (map their guarantees, "
                         f"or list the section in NO_PROMISE if it makes none): {missing}")
    empty = sorted(t for t in readme - NO_PROMISE if not any(ROW.match(line) for line in mapped[t]))
    assert not empty, f"sections of {MAP.name} with no row: {empty}"
    stale = sorted(set(mapped) - readme - MAP_ONLY)
    assert not stale, f"sections of {MAP.name} that README.md no longer has: {stale}"
