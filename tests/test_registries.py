"""The encoder and model registries follow one pattern (register, then build by name), and the
package's module-level imports form no cycle (lazy imports inside functions are not counted)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from histomil.features.encoders import ENCODERS, build_encoder, encoder_names, register_encoder
from histomil.models.registry import MODELS, build_model, model_names, register_model

SRC = Path(__file__).resolve().parents[1] / "src"


def test_register_then_build_an_encoder(monkeypatch):
    from tiny_runs import colour_stats_encoder

    monkeypatch.setattr("histomil.features.encoders.ENCODERS", dict(ENCODERS))
    register_encoder("test_colour_stats", colour_stats_encoder)
    assert "test_colour_stats" in encoder_names()
    assert build_encoder("test_colour_stats", precision="fp32").info.dim == 96
    for taken in ("test_colour_stats", "efficientnet_lite0", "uni_v1", "UNI"):  # names, presets and aliases
        with pytest.raises(ValueError, match="already registered"):
            register_encoder(taken, colour_stats_encoder)


def test_register_then_build_a_model(monkeypatch):
    from histomil.models.abmil import ABMIL

    monkeypatch.setattr("histomil.models.registry.MODELS", dict(MODELS))
    register_model("test_wide_abmil", ABMIL, {"gated": True})
    assert "test_wide_abmil" in model_names()
    assert build_model("test_wide_abmil", 8).pool.gated is True  # the entry's defaults apply
    assert build_model("test_wide_abmil", 8, gated=False).pool.gated is False  # options override them
    with pytest.raises(ValueError, match="already registered"):
        register_model("abmil", ABMIL)


def module_imports() -> dict[str, set[str]]:
    """histomil module -> the histomil modules it imports at module level (not inside functions)."""
    modules = {".".join(p.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__"): p
               for p in (SRC / "histomil").rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps: set[str] = set()
        tree = ast.parse(path.read_text())
        nodes = list(tree.body)
        for node in tree.body:  # imports in a module-level try count; `if TYPE_CHECKING:` ones run never
            if isinstance(node, ast.Try):
                nodes += node.body
        for node in nodes:
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            deps |= {t for t in targets if t in modules and t != name}
        graph[name] = deps
    return graph


def test_no_import_cycle():
    graph = module_imports()
    assert "histomil.models.registry" in graph and "histomil.models.small" in graph["histomil.models.registry"]
    assert "histomil.models.registry" not in graph["histomil.models.small"]
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(dep):] + [dep]))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
