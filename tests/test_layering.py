"""The layering of the top-level files, read from their import statements (no module is imported): the core
below (data, model, moe, stgc, routing) never imports the entry points above (train, eval, demo); train and eval
stand side by side, neither importing the other; benchmarks.py (metric definitions) imports none of ours."""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BELOW = {"data", "model", "moe", "stgc", "routing"}
ABOVE = {"train", "eval"}
STANDALONE = {"benchmarks"}
OURS = BELOW | ABOVE | STANDALONE | {"demo", "cluster"}


def imports(name: str) -> set:
    """Our modules that name.py imports, anywhere in the file (function-level imports count too)."""
    tree = ast.parse(open(os.path.join(ROOT, name + ".py")).read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & OURS - {name}


@pytest.mark.parametrize("name", sorted(BELOW | ABOVE | STANDALONE))
def test_nothing_below_imports_above(name):
    got = imports(name)
    if name in BELOW:
        assert got <= BELOW, f"{name}.py imports {sorted(got - BELOW)}: the core imports no entry point"
    elif name in ABOVE:
        assert not got & (ABOVE | {"demo"}), f"{name}.py imports {sorted(got & ABOVE)}: train and eval stand side by side"
    else:
        assert not got, f"{name}.py imports {sorted(got)}: benchmarks.py stands alone"
