"""The layers DESIGN.md promises, read from the source with ``ast``: ``udfs`` computes without
Spark (only ``udfs/spark/`` imports pyspark), jobs do not import jobs (``pipeline`` runs them),
the import graph of ``jobs`` and ``udfs`` has no loop, and no job catches every exception
(a broken fast path must fail, not turn into a slower path).

Imports inside functions count: a lazy import is still a dependency, and it is where such
leaks hide."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
JOB_MODULES = {"ingest", "caption", "embed", "fuse", "profiles", "topk", "evaluate", "report", "recommend", "synth",
               "pipeline"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path, source: str | None = None) -> set[str]:
    """Absolute names of every module ``path`` imports, at any depth of its code; ``from a
    import b`` yields ``a.b`` too, since ``b`` may be a submodule."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text() if source is None else source, str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def python_files(folder: str) -> list[Path]:
    return sorted(p for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts)


def imports_pyspark(path: Path) -> bool:
    return any(m == "pyspark" or m.startswith("pyspark.") for m in imported_modules(path))


def test_walker_sees_pyspark_where_it_is():
    # Guards the checks below against passing vacuously: the Spark wrappers do import pyspark.
    assert imports_pyspark(ROOT / "udfs" / "spark" / "splits.py")
    assert imports_pyspark(ROOT / "udfs" / "spark" / "schemas.py")
    # An import inside a function is seen too: test_imported_modules_resolves_relative_and_nested_imports.


def test_udfs_outside_spark_wrappers_import_no_pyspark():
    leaks = [str(p.relative_to(ROOT)) for p in python_files("udfs")
             if "spark" not in p.relative_to(ROOT / "udfs").parts[:-1] and imports_pyspark(p)]
    assert leaks == [], f"move the Spark code of {leaks} into udfs/spark/"


def import_graph(*folders: str) -> dict[str, set[str]]:
    modules = {module_name(p): p for folder in folders for p in python_files(folder)}
    graph = {}
    for name, path in modules.items():
        # A package's import also runs its __init__, so edges go to every module named.
        graph[name] = {m for m in imported_modules(path) if m in modules and m != name}
    return graph


def test_no_job_imports_another_job():
    offenders = sorted((name, dep) for name, deps in import_graph("jobs").items() for dep in deps
                       if name != "jobs.pipeline" and dep.rpartition(".")[2] in JOB_MODULES
                       and dep.count(".") == 1)
    assert offenders == [], "jobs import the plan, the tables and udfs, not each other"


def cycles_of(graph: dict[str, set[str]]) -> list[list[str]]:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return cycles


def test_the_import_graph_of_jobs_and_udfs_has_no_cycle():
    assert cycles_of({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]  # it sees one
    assert cycles_of(import_graph("jobs", "udfs")) == []


# The job runner records any failure as a failed run and re-raises it; doctor and setup report
# every failure of what they check with its fix.
BROAD_CATCH_ALLOWED = {"jobs/job_run.py", "jobs/doctor.py", "jobs/setup_jars.py"}


def broad_handlers(path: Path, source: str | None = None) -> list[int]:
    """Lines of ``except:``, ``except Exception`` and ``except BaseException`` (alone or in a tuple)."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text() if source is None else source, str(path))):
        if isinstance(node, ast.ExceptHandler):
            caught = node.type.elts if isinstance(node.type, ast.Tuple) else [node.type]
            if node.type is None or any(isinstance(t, ast.Name) and t.id in ("Exception", "BaseException")
                                        for t in caught):
                lines.append(node.lineno)
    return lines


def test_jobs_catch_only_the_errors_they_name():
    assert broad_handlers(ROOT / "probe.py", "try:\n    f()\nexcept (OSError, Exception):\n    pass\n") == [3]
    for allowed in BROAD_CATCH_ALLOWED:
        assert broad_handlers(ROOT / allowed), f"{allowed} catches no broad exception: drop it from the allow-list"
    sites = [f"{p.relative_to(ROOT)}:{line}" for p in python_files("jobs")
             if str(p.relative_to(ROOT)) not in BROAD_CATCH_ALLOWED for line in broad_handlers(p)]
    assert sites == [], "catch the exceptions that choose a path or that you can name, and let others fail the job"


# A function that reads, validates, computes and writes wants splitting into named steps.
MAX_FUNCTION_LINES = 80


def long_functions(path: Path, source: str | None = None) -> list[str]:
    """``name:first line (lines)`` of every function (nested ones too) longer than MAX_FUNCTION_LINES."""
    tree = ast.parse(path.read_text() if source is None else source, str(path))
    return [f"{node.name}:{node.lineno} ({node.end_lineno - node.lineno + 1} lines)" for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]


def test_no_function_is_longer_than_80_lines():
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES))
    assert long_functions(ROOT / "probe.py", f"def ok():\n{body[:-len('    x79 = 79')-1]}\n") == []
    assert long_functions(ROOT / "probe.py", f"def long():\n{body}") == ["long:1 (81 lines)"]
    found = [f"{p.relative_to(ROOT)}:{site}" for folder in ("jobs", "udfs") for p in python_files(folder)
             for site in long_functions(p)]
    assert found == [], "split these into named steps"


@pytest.mark.parametrize("source, expected", [
    ("from . import tables\n", {"jobs", "jobs.tables"}),
    ("def f():\n    from .config import load_config\n", {"jobs.config", "jobs.config.load_config"}),
    ("from pyspark.sql import functions as F\n", {"pyspark.sql", "pyspark.sql.functions"}),
])
def test_imported_modules_resolves_relative_and_nested_imports(source, expected):
    assert imported_modules(ROOT / "jobs" / "probe.py", source) == expected


SCHEMAS_MODULE = "udfs/spark/schemas.py"
# Schemas that parse input files, built from the file's own header: they stay with their reader.
INPUT_PARSING_SCHEMAS = {"jobs/adapters/base.py", "jobs/adapters/amazon.py"}


def struct_type_sites(path: Path) -> list[int]:
    """Lines where ``path`` constructs a ``StructType`` (``T.StructType(...)`` or ``StructType(...)``)."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name == "StructType":
                lines.append(node.lineno)
    return lines


def schema_constant_sites(path: Path, endings: tuple[str, ...] = ("_DDL",)) -> list[int]:
    """Lines where ``path`` names a Spark type at module level: a ``X_DDL`` string (``X_SCHEMA``
    names Arrow schemas too, e.g. the caption staging files', which are not Spark's)."""
    return [node.lineno for node in ast.parse(path.read_text(), str(path)).body
            if isinstance(node, (ast.Assign, ast.AnnAssign))
            for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
            if isinstance(target, ast.Name) and target.id.endswith(endings)]


def test_walker_sees_struct_types_where_they_are():
    # Guards the check below against passing vacuously.
    assert len(struct_type_sites(ROOT / SCHEMAS_MODULE)) > 10
    for allowed in INPUT_PARSING_SCHEMAS:
        assert struct_type_sites(ROOT / allowed), f"{allowed} no longer builds a schema: drop it from the allow-list"


def test_every_spark_output_schema_is_in_the_schemas_module():
    # What this cannot see: a DDL string passed inline for a small frame a job builds on the
    # driver (topk's candidate rows), which a table write then casts to the contract's schema.
    sites = [f"{p.relative_to(ROOT)}:{line}" for folder in ("jobs", "udfs", "benchmarks") for p in python_files(folder)
             if str(p.relative_to(ROOT)) not in INPUT_PARSING_SCHEMAS | {SCHEMAS_MODULE}
             for line in struct_type_sites(p)]
    assert sites == [], f"define these schemas in {SCHEMAS_MODULE} and import them"
    constants = [f"{p.relative_to(ROOT)}:{line}" for folder in ("jobs", "udfs", "benchmarks")
                 for p in python_files(folder) if str(p.relative_to(ROOT)) != SCHEMAS_MODULE
                 for line in schema_constant_sites(p)]
    assert constants == [], f"declare these output types (DDL or StructType) in {SCHEMAS_MODULE}"
    assert len(schema_constant_sites(ROOT / SCHEMAS_MODULE)) >= 7  # the walker sees them where they are


# udfs by domain; at the top only the public entry point and the two names every domain shares.
UDFS_DOMAINS = {"caption", "encode", "fusion", "rank", "evaluate", "io", "report", "spark", "resources"}
UDFS_TOP_MODULES = {"__init__.py", "recommender.py", "representations.py", "synth.py"}


def test_udfs_is_grouped_by_domain():
    folders = {p.name for p in (ROOT / "udfs").iterdir() if p.is_dir() and p.name != "__pycache__"}
    modules = {p.name for p in (ROOT / "udfs").glob("*.py")}
    assert folders == UDFS_DOMAINS and modules == UDFS_TOP_MODULES, \
        "put a new udfs module in its domain's package (README, Layout)"
    # tests mirror the layout
    for domain in UDFS_DOMAINS - {"resources"}:
        for test in (ROOT / "tests" / "udfs" / domain).glob("test_*.py"):
            module = test.name[len("test_"):]
            assert not (ROOT / "udfs" / module).exists(), f"{test} tests udfs/{module}, not udfs/{domain}/{module}"
