"""The package layers written in docs/architecture.md hold: no module imports from a higher layer (lazy
imports inside functions included), no two packages import each other, and no circle of modules."""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "dsft"


def layers() -> dict[str, int]:
    """`Layers, lowest first: a, b | c | ...` from docs/architecture.md: package -> layer index."""
    text = (REPO / "docs/architecture.md").read_text()
    line = re.search(r"^Layers, lowest first: (.+)$", text, re.M).group(1).strip("`")
    return {name.strip(): i for i, group in enumerate(line.split("|")) for name in group.split(",")}


def package_of(path: Path) -> str:
    parts = path.relative_to(PACKAGE).parts
    return parts[0].removesuffix(".py") if parts[0] != "__init__.py" else "dsft"


def imports() -> list[tuple[str, str, str]]:
    """(importing module, its package, imported dsft package) for every import anywhere in a module."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            for name in names:
                if name == "dsft" or name.startswith("dsft."):
                    target = name.split(".")[1] if "." in name else "dsft"
                    found.append((str(path.relative_to(REPO)), package_of(path), target))
    return found


def test_no_import_from_a_higher_layer() -> None:
    order = layers()
    packages = {package_of(p) for p in PACKAGE.rglob("*.py")}
    assert packages <= set(order), f"packages missing from docs/architecture.md: {packages - set(order)}"
    upward = [f"{module} ({pkg}) imports dsft.{target}" for module, pkg, target in imports()
              if target != pkg and order[target] > order[pkg]]
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)


def test_no_cycle_between_packages() -> None:
    graph: dict[str, set[str]] = defaultdict(set)
    for _, pkg, target in imports():
        if target != pkg:
            graph[pkg].add(target)
    cycles = sorted(f"{a} <-> {b}" for a in graph for b in graph[a] if a in graph.get(b, set()) and a < b)
    assert not cycles, cycles


def module_graph() -> dict[str, set[str]]:
    """dotted module -> the dsft modules it imports anywhere in its text (function-level imports included; a
    module's own parent package is not counted)."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t in modules and t != name and not name.startswith(t + ".")}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The groups of modules that reach each other (strongly connected, more than one module)."""
    found, index, low, stack, on = [], {}, {}, [], set()

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v), on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while not group or group[-1] != v:
                group.append(stack.pop())
                on.discard(group[-1])
            if len(group) > 1:
                found.append(sorted(group))

    for v in list(graph):
        if v not in index:
            visit(v)
    return found


def test_no_two_modules_import_each_other() -> None:
    """No circle of modules, however long and wherever the import sits (a function-level import included)."""
    assert not circles(module_graph()), circles(module_graph())


def test_a_circle_is_found() -> None:
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    graph = module_graph()
    graph["dsft.runs.run_dir"].add("dsft.train.resume")  # resume imports run_dir: the circle this test keeps out
    assert any("dsft.runs.run_dir" in group and "dsft.train.resume" in group for group in circles(graph))


def oversized(root: Path, max_lines: int = 400, max_function: int = 60) -> list[str]:
    """Files of max_lines lines or more, and functions (their decorators included) of max_function or more."""
    found = []
    for path in sorted(root.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        if len(text.splitlines()) >= max_lines:
            found.append(f"{path.relative_to(root.parent)}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = node.decorator_list[0].lineno if node.decorator_list else node.lineno
                if node.end_lineno - first + 1 >= max_function:
                    found.append(f"{path.relative_to(root.parent)}: {node.name} is {node.end_lineno - first + 1} lines")
    return found


def test_each_file_under_400_lines_and_each_function_under_60() -> None:
    assert not oversized(PACKAGE), "\n".join(oversized(PACKAGE))


def test_an_oversized_function_is_found(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "long.py").write_text("def f():\n" + "    x = 1\n" * 60)
    assert oversized(package) == ["pkg/long.py: f is 61 lines"]


def _sum_objective():
    """SFT with the loss summed over the batch's loss tokens instead of averaged, registered from here."""
    from dsft.train import objective as plugins
    from dsft.train.sft import SFT
    from dsft.train.trainer import DsftSFTTrainer

    class SummedSFTTrainer(DsftSFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            tokens = (inputs["labels"][:, 1:] != -100).sum()
            return (result[0] * tokens, result[1]) if return_outputs else result * tokens

    class SummedSFT(SFT):
        name = "sft-sum"

        def trainer(self, model, args, prepared, callbacks):
            from dsft.train.trainer import trainer_rows

            return SummedSFTTrainer(model=model, args=args, callbacks=callbacks, processing_class=prepared.tokenizer,
                                    train_dataset=trainer_rows(prepared.train, args, prepared.recipe.data.max_length))

    return plugins.register(SummedSFT())


def test_an_objective_from_outside_dsft_trains_through_the_cli_body(make_recipe, tmp_path: Path) -> None:
    import json

    from dsft.cli._common import run_training

    from dsft.train import objective as plugins


    goal = _sum_objective()
    recipe = make_recipe(training={"max_steps": 2, "logging_steps": 1})
    try:
        mean = run_training("sft", recipe, [f"output_dir={tmp_path / 'mean'}"], False, False, None, 1)
        summed = run_training(goal.name, recipe, [f"output_dir={tmp_path / 'sum'}"], False, False, None, 1)
    finally:
        plugins.unregister(goal.name)
    assert goal.name not in plugins.OBJECTIVES and "messages" in plugins.objective("sft").formats
    info = json.loads((tmp_path / "sum/run.json").read_text())
    assert info["command"] == "sft-sum" and info["status"] == "complete"
    assert (tmp_path / "sum/adapter/adapter_model.safetensors").is_file()
    assert summed.losses[0] > 20 * mean.losses[0]  # the same first batch, its loss summed over ~170 tokens
