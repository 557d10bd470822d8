"""The modules form one chain a reader can follow: each imports only modules before it, and none
imports another that imports it back (not even lazily, inside a function)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The reading order of the README's file map; studies/ may use any of these, none of these uses studies/
# except train.py, which builds the encoder-conditioned variant.
CHAIN = ["models", "packing", "data", "evaluation", "train", "evaluate", "predict_and_visualize"]


def project_modules() -> dict:
    """{module name: path} of the project's own modules (top level, evaluation/, studies/)."""
    paths = [*ROOT.glob("*.py"), *ROOT.glob("evaluation/*.py"), *ROOT.glob("studies/*.py")]
    return {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p for p in paths}


def imports_of(path: Path, known: set) -> set:
    """Project modules imported anywhere in the file, including inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        found |= {n for n in names if n in known}
    return found


def group(module: str) -> str:
    return module.split(".")[0]


def test_no_two_modules_import_each_other():
    modules = project_modules()
    graph = {m: imports_of(p, set(modules)) - {m} for m, p in modules.items()}
    seen, stack = set(), []

    def visit(m):  # depth-first search for a cycle
        if m in stack:
            raise AssertionError(f"import cycle: {' -> '.join(stack[stack.index(m):] + [m])}")
        if m in seen:
            return
        stack.append(m)
        for other in graph[m]:
            visit(other)
        stack.pop()
        seen.add(m)

    for m in graph:
        visit(m)


def test_each_module_imports_only_those_before_it_in_the_chain():
    modules = project_modules()
    for m, path in modules.items():
        if group(m) not in CHAIN:
            continue
        rank = CHAIN.index(group(m))
        for other in imports_of(path, set(modules)):
            if group(other) == "studies":
                assert m == "train", f"{m} imports {other}: only train.py builds a variant from studies/"
            else:
                assert CHAIN.index(group(other)) <= rank, f"{m} imports {other}, which comes after it in {CHAIN}"


def test_the_check_sees_a_cycle(tmp_path):
    """The checker itself: two files that import each other are found."""
    (tmp_path / "a.py").write_text("def f():\n    import b\n")
    (tmp_path / "b.py").write_text("import a\n")
    assert imports_of(tmp_path / "a.py", {"a", "b"}) == {"b"}
    assert imports_of(tmp_path / "b.py", {"a", "b"}) == {"a"}
