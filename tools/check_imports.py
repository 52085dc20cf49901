#!/usr/bin/env python3
"""Import structure of ``src/tunelab``: cycles, lazy imports and private names used across modules.

Run from the repository root (stdlib only, reads the source with :mod:`ast`, imports nothing)::

    python tools/check_imports.py            # the report; exit 1 if there is an import cycle
    python tools/check_imports.py --json     # the same as JSON

Three checks:

1. **cycles**: the module import graph (imports at module level, in functions, under ``if
   TYPE_CHECKING:``; relative imports resolved; ``from x import y`` is an edge to ``x.y`` where
   ``x.y`` is a module, else to ``x``) and its strongly connected components of more than one
   module. Layers import downwards only, so there must be none.
2. **function-level imports**: an ``import`` inside a function is kept only for an optional or
   heavy dependency (:data:`LAZY_ALLOWED`: torch and the model stack, and the packages of the
   extras), so that ``import tunelab.cli`` and the config stay light. A tunelab module that loads
   one of those when it is imported (at its top, directly or through other tunelab modules) counts
   as heavy too: ``cli.py`` imports the verb that trains inside the verb's function, so that
   ``tunelab --help`` does not load torch. Anything else (light tunelab modules, the standard
   library, light dependencies) belongs at the top of the file, unless a comment on the import's
   line says why it is lazy.
3. **private names across modules**: ``from tunelab.a import _x`` or ``a._x`` (``a`` a tunelab
   module) in another module. A name used elsewhere is part of that module's interface: make it
   public, or move the code that needs it.
"""

from __future__ import annotations

import argparse
import ast
import io
import json
import sys
import tokenize
from dataclasses import asdict, dataclass, field
from pathlib import Path

#: Top-level packages that may be imported inside a function: heavy to import (the model stack)
#: or optional (an extra of pyproject.toml, a test/bench dependency), so that torch-free paths
#: (``import tunelab.cli``, reading a config) and a core install without the extras keep working.
LAZY_ALLOWED = frozenset({
    # the model stack (torch is installed separately; importing any of these costs seconds)
    "torch", "transformers", "peft", "accelerate", "safetensors", "huggingface_hub", "tokenizers",
    "deepspeed", "bitsandbytes", "gguf", "datasets", "pyarrow", "sklearn", "sacrebleu", "rouge_score",
    # numerics and templating: a second or more at import (scipy), ~0.1-0.3 s each (numpy, jinja2)
    "numpy", "scipy", "jinja2",
    # extras: serve, sweep, data, report, mlflow, tensorboard
    "fastapi", "starlette", "uvicorn", "prometheus_client", "optuna", "jieba", "datasketch", "matplotlib",
    "mlflow", "tensorboard", "gradio", "llama_cpp", "psutil", "platformdirs", "nltk",
    # the ui extra: gradio's plots take pandas tables (pandas is not a core dependency)
    "pandas",
})

PACKAGE = "tunelab"


@dataclass
class LazyImport:
    where: str  # path:line
    module: str  # what is imported (resolved)


@dataclass
class PrivateUse:
    where: str
    name: str  # module._name


@dataclass
class Report:
    cycles: list[list[str]] = field(default_factory=list)
    lazy_imports: list[LazyImport] = field(default_factory=list)
    private_uses: list[PrivateUse] = field(default_factory=list)
    modules: int = 0


def module_names(src: Path) -> dict[str, Path]:
    """``{"tunelab.models.load": path}`` for every module and package under ``src/tunelab``."""
    out = {}
    for path in sorted((src / PACKAGE).rglob("*.py")):
        parts = path.with_suffix("").relative_to(src).parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _comment_lines(text: str) -> set[int]:
    """Lines holding a comment that explains something (not only a ``noqa`` / ``type:`` directive)."""
    lines = set()
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type == tokenize.COMMENT:
            body = tok.string.lstrip("#").strip()
            if body and not body.lower().startswith(("noqa", "type:")):
                lines.add(tok.start[0])
    return lines


class _Visitor(ast.NodeVisitor):
    def __init__(self, name: str, is_package: bool, modules: dict[str, Path]):
        self.name, self.modules = name, modules
        self.package = name if is_package else name.rpartition(".")[0]
        self.depth = 0  # inside how many functions
        self.imports: list[tuple[ast.AST, list[str], bool]] = []  # node, resolved targets, in a function
        self.private: list[tuple[int, str]] = []  # line, module._name
        self.aliases: dict[str, str] = {}  # local name -> tunelab module it is bound to

    def _known(self, dotted: str) -> str | None:
        """The longest prefix of ``dotted`` that is a tunelab module."""
        while dotted and dotted not in self.modules:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    def visit_FunctionDef(self, node):
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_AsyncFunctionDef = visit_FunctionDef
    visit_Lambda = visit_FunctionDef

    def visit_Import(self, node: ast.Import):
        targets = []
        for a in node.names:
            targets.append(a.name)
            known = self._known(a.name)
            if known:
                if a.asname:
                    self.aliases[a.asname] = known
                else:  # ``import tunelab.a.b`` binds ``tunelab``; attribute chains are resolved in full
                    self.aliases.setdefault(a.name.split(".")[0], a.name.split(".")[0])
        self.imports.append((node, targets, self.depth > 0))

    def visit_ImportFrom(self, node: ast.ImportFrom):
        if node.level:
            base = self.package.split(".")
            base = base[: len(base) - (node.level - 1)]
            module = ".".join(base + ([node.module] if node.module else []))
        else:
            module = node.module or ""
        targets = []
        for a in node.names:
            sub = f"{module}.{a.name}"
            if sub in self.modules:
                targets.append(sub)
                self.aliases[a.asname or a.name] = sub
            else:
                targets.append(module)
                if (a.name.startswith("_") and not a.name.startswith("__") and self._known(module)
                        and self._known(module) != self.name):
                    self.private.append((node.lineno, f"{module}.{a.name}"))
        self.imports.append((node, targets, self.depth > 0))

    def visit_Attribute(self, node: ast.Attribute):
        chain, inner = [node.attr], node.value
        while isinstance(inner, ast.Attribute):
            chain.append(inner.attr)
            inner = inner.value
        if isinstance(inner, ast.Name) and inner.id in self.aliases:
            parts = [self.aliases[inner.id], *reversed(chain)]
            # the longest module prefix, then the name right after it
            for cut in range(len(parts) - 1, 0, -1):
                dotted = ".".join(parts[:cut])
                if dotted in self.modules:
                    attr = parts[cut]
                    if attr.startswith("_") and not attr.startswith("__") and dotted != self.name:
                        self.private.append((node.lineno, f"{dotted}.{attr}"))
                    return  # the whole chain is handled
        self.generic_visit(node)


def _top(module: str) -> str:
    return module.split(".")[0]


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Components of more than one node (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return sorted(out)


def analyse(src: str | Path = "src") -> Report:
    """All three checks over ``src/tunelab`` (paths in the report are relative to ``src``'s parent)."""
    src = Path(src)
    modules = module_names(src)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    report = Report(modules=len(modules))
    visitors = {}
    for name, path in modules.items():
        visitor = _Visitor(name, path.name == "__init__.py", modules)
        visitor.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        visitors[name] = visitor
    heavy = _heavy_modules(visitors)
    for name, path in modules.items():
        visitor, explained = visitors[name], _comment_lines(path.read_text(encoding="utf-8"))
        rel = path.relative_to(src.parent) if src.is_absolute() == path.is_absolute() else path
        for node, targets, in_function in visitor.imports:
            for target in targets:
                known = visitor._known(target)
                if known and known != name:
                    graph[name].add(known)
            if not in_function:
                continue
            if any(ln in explained for ln in range(node.lineno, (node.end_lineno or node.lineno) + 1)):
                continue
            for target in dict.fromkeys(targets):
                if _top(target) not in LAZY_ALLOWED and visitor._known(target) not in heavy:
                    report.lazy_imports.append(LazyImport(f"{rel}:{node.lineno}", target))
        for line, what in visitor.private:
            report.private_uses.append(PrivateUse(f"{rel}:{line}", what))
    report.cycles = strongly_connected(graph)
    return report


def _heavy_modules(visitors: dict[str, _Visitor]) -> set[str]:
    """The tunelab modules whose import loads a :data:`LAZY_ALLOWED` package: directly at their top, or
    through the tunelab modules they import at their top (or through their package's ``__init__``)."""
    top_level = {name: {t for node, targets, in_function in v.imports if not in_function for t in targets}
                 for name, v in visitors.items()}
    heavy = {name for name, targets in top_level.items() if any(_top(t) in LAZY_ALLOWED for t in targets)}
    changed = True
    while changed:
        changed = False
        for name, targets in top_level.items():
            if name in heavy:
                continue
            parents = {name.rsplit(".", i)[0] for i in range(1, name.count(".") + 1)}
            needs = {visitors[name]._known(t) for t in targets} | (parents & set(visitors))
            if needs & heavy:
                heavy.add(name)
                changed = True
    return heavy


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", default="src", help="the folder that holds the tunelab package (default: src)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--summary", action="store_true", help="print only the counts")
    args = parser.parse_args(argv)
    report = analyse(args.src)
    if args.json:
        print(json.dumps(asdict(report), indent=1))
    elif not args.summary:
        for comp in report.cycles:
            print("cycle: " + " <-> ".join(comp))
        for imp in report.lazy_imports:
            print(f"function-level import: {imp.where} {imp.module}")
        for use in report.private_uses:
            print(f"private name used across modules: {use.where} {use.name}")
    print(f"{report.modules} modules: {len(report.cycles)} import cycle(s), {len(report.lazy_imports)} "
          f"function-level import(s) not of an optional/heavy dependency, {len(report.private_uses)} private "
          "name(s) used across modules", file=sys.stderr if args.json else sys.stdout)
    return 1 if report.cycles else 0


if __name__ == "__main__":
    sys.exit(main())
