"""The package's layout holds: each direction is a package that never reaches into the other, the
shared parts (store/, delivery/) know neither direction, and no module or class grows past a size
a reader takes in at once without saying why."""

from __future__ import annotations

import ast
import graphlib
import itertools
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "refiner_source"
MAX_MODULE_LINES = 400
MAX_CLASS_LINES = 200
STATED_REASON = re.compile(r"\blong\b", re.IGNORECASE)

# folder under refiner_source/ -> the packages of refiner_source none of its modules may import
BANNED = {
    "to_segment": ("to_refiner", "web", "ops", "run"),
    "to_refiner": ("to_segment", "web", "ops", "run"),
    "store": ("to_segment", "to_refiner", "web", "ops", "run", "delivery"),
    "delivery": ("to_segment", "to_refiner", "web", "ops", "run"),
    # what every direction shares (the registry, the entry, the refusal, the mapping file's rules):
    # below them all, it knows none of them
    "directions": ("config", "store", "delivery", "privacy", "to_segment", "to_refiner", "web", "ops", "run"),
}
# folder under refiner_source/ -> the libraries none of its modules may import: the directions,
# the store and delivery run in processes that serve no HTTP (the delivery worker, a backfill's
# mapping processes), and the web face sits above them.
FRAMEWORKS = ("flask", "werkzeug")
FRAMEWORK_FREE = ("directions", "to_segment", "to_refiner", "store", "delivery")


def module_name(path: Path, root: Path) -> tuple[str, bool]:
    """(the dotted name of the module at `path`, whether it is a package's __init__)."""
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    return ".".join(parts[:-1] if is_package else parts), is_package


def imports(path: Path, root: Path) -> list[tuple[int, list[str]]]:
    """(line, absolute module names) of every import in the file, at any depth (a function's, a
    TYPE_CHECKING block's: a type is a dependency too), relative ones resolved. `from a import b`
    names a and a.b, since b may be a module; importlib.import_module("...") and __import__("...")
    with a literal name count too."""
    name, is_package = module_name(path, root)
    package = name if is_package else name.rpartition(".")[0]
    found: list[tuple[int, list[str]]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.append((node.lineno, [alias.name for alias in node.names]))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            found.append((node.lineno, [source, *(f"{source}.{alias.name}" for alias in node.names if alias.name != "*")]))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
            if called in ("import_module", "__import__"):
                found.append((node.lineno, [node.args[0].value]))
    return found


def forbidden_imports(root: Path, folder: str, banned: tuple[str, ...]) -> list[str]:
    """Every import, in the modules under root/folder, of a banned package of root's package."""
    prefixes = [f"{root.name}.{b}" for b in banned]
    problems = []
    for path in sorted((root / folder).rglob("*.py")):
        for line, names in imports(path, root):
            hit = next((n for n in names if any(n == p or n.startswith(p + ".") for p in prefixes)), None)
            if hit is not None:
                problems.append(f"{path.relative_to(root.parent)}:{line} imports {hit}")
    return problems


@pytest.mark.parametrize("folder", list(BANNED))
def test_no_module_imports_what_its_folder_must_not_know(folder):
    assert (PACKAGE / folder).is_dir(), folder
    problems = forbidden_imports(PACKAGE, folder, BANNED[folder])
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("folder", FRAMEWORK_FREE)
def test_no_direction_store_or_delivery_module_imports_the_web_framework(folder):
    problems = [
        f"{path.relative_to(PACKAGE.parent)}:{line} imports {name}"
        for path in sorted((PACKAGE / folder).rglob("*.py"))
        for line, names in imports(path, PACKAGE)
        for name in names[:1]
        if name.split(".")[0] in FRAMEWORKS
    ]
    assert not problems, "\n".join(problems)


def test_the_import_check_catches_every_way_of_importing(tmp_path):
    """The check above can fail: a package made for the purpose, each kind of import in its own module."""
    root = tmp_path / "refiner_source"
    for folder in ("to_segment", "to_refiner", "to_segment/deep"):
        (root / folder).mkdir(parents=True)
        (root / folder / "__init__.py").write_text("")
    (root / "__init__.py").write_text("")
    bad = {
        "absolute.py": "import refiner_source.to_refiner.webhook\n",
        "from_absolute.py": "from refiner_source.to_refiner import mapping\n",
        "from_package.py": "from refiner_source import to_refiner\n",
        "relative.py": "from ..to_refiner.events import SegmentEvent\n",
        "relative_package.py": "from .. import to_refiner\n",
        "in_function.py": "def later():\n    if True:\n        from refiner_source.to_refiner import api\n",
        "dynamic.py": "import importlib\nimportlib.import_module('refiner_source.to_refiner.delivery')\n",
        "deep/relative.py": "from ...to_refiner import api\n",
    }
    for name, code in bad.items():
        (root / "to_segment" / name).write_text(code)
    (root / "to_segment" / "fine.py").write_text("from . import fine\nfrom ..directions import SEGMENT\nimport refiner_source.store\n")
    problems = forbidden_imports(root, "to_segment", ("to_refiner",))
    assert sorted({p.split(":")[0] for p in problems}) == sorted(f"refiner_source/to_segment/{name}" for name in bad)


def first_paragraph(docstring: str | None) -> str:
    return (docstring or "").strip().split("\n\n")[0]


def sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_no_module_is_over_400_lines_without_saying_why():
    """A longer module says why in its docstring's first paragraph, with the word "long"."""
    over = []
    for path in sources():
        text = path.read_text()
        lines = len(text.splitlines())
        if lines > MAX_MODULE_LINES and not STATED_REASON.search(first_paragraph(ast.get_docstring(ast.parse(text)))):
            over.append(f"{path.relative_to(PACKAGE.parent)}: {lines} lines")
    assert not over, "\n".join(over)


def test_no_class_is_over_200_lines_without_saying_why():
    """A longer class says why in its docstring, with the word "long"."""
    over = []
    for path in sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_CLASS_LINES and not STATED_REASON.search(ast.get_docstring(node) or ""):
                    over.append(f"{path.relative_to(PACKAGE.parent)}: class {node.name}, {lines} lines")
    assert not over, "\n".join(over)


def room_of(name: str, root: Path) -> str | None:
    """The room (a folder or a module right under root) that the module `name` is in; None for
    another library's, or the package's own __init__."""
    parts = name.split(".")
    if parts[0] != root.name or len(parts) < 2:
        return None
    room = parts[1]
    return room if (root / room).is_dir() or (root / f"{room}.py").is_file() else None


def room_imports(root: Path) -> dict[str, dict[str, str]]:
    """room -> {each room it imports: the first import that says so, as path:line}. The package's
    __init__ (the app factory, which assembles every room) stands above them all and is left out."""
    graph: dict[str, dict[str, str]] = {}
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        room = relative.parts[0].removesuffix(".py")
        if room == "__init__":
            continue
        graph.setdefault(room, {})
        for line, names in imports(path, root):
            for name in names:
                other = room_of(name, root)
                if other is not None and other != room:
                    graph[room].setdefault(other, f"{path.relative_to(root.parent)}:{line}")
    return graph


def test_the_rooms_import_one_way():
    """Every folder and module right under refiner_source/ can be given a floor such that each
    imports only rooms below it: no circle, at any depth (a function's import, a type's)."""
    graph = room_imports(PACKAGE)
    try:
        order = list(graphlib.TopologicalSorter({room: set(others) for room, others in graph.items()}).static_order())
    except graphlib.CycleError as exc:
        cycle = exc.args[1]
        pytest.fail("a circle: " + ", ".join(f"{a} -> {b} ({graph[a][b]})" for a, b in itertools.pairwise(cycle)))
    assert order.index("directions") < order.index("store") < order.index("delivery") < order.index("web") < order.index("run")


def test_the_room_check_finds_a_circle(tmp_path):
    root = tmp_path / "refiner_source"
    (root / "a").mkdir(parents=True)
    (root / "a" / "__init__.py").write_text("")
    (root / "a" / "deep.py").write_text("def later():\n    from refiner_source import b\n")
    (root / "b.py").write_text("from refiner_source.a.deep import later\n")
    graph = room_imports(root)
    assert graph == {"a": {"b": "refiner_source/a/deep.py:2"}, "b": {"a": "refiner_source/b.py:1"}}
    with pytest.raises(graphlib.CycleError):
        list(graphlib.TopologicalSorter({room: set(others) for room, others in graph.items()}).static_order())


TESTS = Path(__file__).resolve().parent
HELPERS = {"fixtures", "standin", "__pycache__"}  # not tests of a package: data, and the stand-in destination


def test_the_tests_mirror_the_packages():
    """tests/<package>/ for each package's tests, tests/e2e/ for whole services, and the tests of the
    top-level modules in tests/ itself: a folder of tests names a package of refiner_source."""
    folders = {p.name for p in TESTS.iterdir() if p.is_dir()} - HELPERS
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert folders - packages == {"e2e"}, folders - packages
    for folder in folders:
        assert (TESTS / folder / "__init__.py").is_file(), folder  # unique module names across folders
        assert any((TESTS / folder).glob("test_*.py")), folder

