"""The project's modules import one way: no import circle, and predicting never loads the trainer."""
import ast
import pathlib
import subprocess
import sys

import pytest

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


def _last_line_of_python(code):
    """The last line a fresh interpreter prints running ``code`` in the repository root."""
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def test_importing_inference_does_not_load_the_trainer():
    code = ("import sys, inference, export_bioimageio; "
            "print(sorted(m for m in ('train_config', 'trainer', 'steps', 'imagereader') if m in sys.modules))")
    assert _last_line_of_python(code) == "[]"


@pytest.mark.parametrize("modules", ["models", "image_io, writers"])
def test_the_registry_and_the_image_modules_import_without_tensorflow(modules):
    # The registry imports a model's module (and TensorFlow) only when that model is asked for.
    code = f"import sys, {modules}; print('tensorflow' in sys.modules, 'keras' in sys.modules)"
    assert _last_line_of_python(code) == "False False"


def test_the_registry_imports_a_model_when_it_is_asked_for():
    code = ("import sys, models; before = 'models.unet' in sys.modules; "
            "print(before, models.geometry('unet').size_divisor, 'models.unet' in sys.modules)")
    assert _last_line_of_python(code) == "False 16 True"
