"""The project's modules import one way: no import circle, and predicting never loads the trainer."""
import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _project_imports():
    """{module: set of project modules it imports anywhere in its file} for the top-level modules."""
    files = {path.stem: path for path in ROOT.glob("*.py")}
    files["models"] = ROOT / "models" / "__init__.py"
    graph = {}
    for name, path in files.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                       else [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            found.update(target.split(".")[0] for target in targets)
        graph[name] = {target for target in found if target in files and target != name}
    return graph


def _cycles(graph):
    cycles, state = [], {}

    def visit(node, path):
        state[node] = "open"
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                cycles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return cycles


def test_no_import_circle_among_project_modules():
    graph = _project_imports()
    assert {"trainer", "train_config", "steps", "inference", "checkpoints", "errors"} <= set(graph)
    assert _cycles(graph) == [], f"import circles: {_cycles(graph)}"
    assert graph["errors"] == set(), "errors.py must stay a leaf"


def test_cycle_finder_sees_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def test_importing_inference_does_not_load_the_trainer():
    code = ("import sys, inference, export_bioimageio; "
            "print(sorted(m for m in ('train_config', 'trainer', 'steps', 'imagereader') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"
