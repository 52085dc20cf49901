"""A Go ``text/template`` interpreter for the subset Ollama templates use (the test oracle of --ollama).

Actions: ``range $i, $x := EXPR`` / ``if`` / ``else if`` / ``else`` / ``end``, ``$v := EXPR``, and
printing an expression; trim markers ``{{-`` / ``-}}``. Expressions: function calls (``eq``, ``ne``,
``and``, ``or``, ``not``, ``len``, ``slice``, ``index``), parentheses, fields (``.Role``,
``$.Messages``, ``(index .Messages 0).Role``), variables, string and integer literals. Semantics as
in Go's documentation: ``range`` sets dot to the element, ``$`` is the data passed to ``render``,
variables live until the ``end`` of their block. Anything else raises, so the test fails loudly.
"""

from __future__ import annotations

import re

_ACTION = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.S)
_TOKEN = re.compile(r'\s*("(?:[^"\\]|\\.)*"|\(|\)|\$?[A-Za-z_]*(?:\.[A-Za-z_]+)+|\$[A-Za-z_]*|\.|[A-Za-z_]+|-?\d+)')


def _lex(text: str) -> list[tuple[str, str]]:
    """[("text", s) | ("action", body)] with trim markers applied."""
    out: list[tuple[str, str]] = []
    pos = 0
    for m in _ACTION.finditer(text):
        literal = text[pos:m.start()]
        if m.group(1):
            literal = literal.rstrip()
        out.append(("text", literal))
        out.append(("action", m.group(2)))
        pos = m.end()
        if m.group(3):
            while pos < len(text) and text[pos].isspace():
                pos += 1
    out.append(("text", text[pos:]))
    return out


def _tokens(expr: str) -> list[str]:
    toks, pos = [], 0
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if not m or m.end() == pos:
            if expr[pos:].strip() == "":
                break
            raise ValueError(f"cannot parse {expr[pos:]!r}")
        toks.append(m.group(1))
        pos = m.end()
    return toks


def _field(value, path: list[str]):
    for name in path:
        value = value[name] if isinstance(value, dict) else getattr(value, name)
    return value


class _Eval:
    FUNCS = {
        "eq": lambda a, *b: any(a == x for x in b),
        "ne": lambda a, b: a != b,
        "and": lambda *a: next((x for x in a if not x), a[-1]),
        "or": lambda *a: next((x for x in a if x), a[-1]),
        "not": lambda a: not a,
        "len": len,
        "slice": lambda s, *i: s[i[0]:i[1]] if len(i) == 2 else s[i[0]:] if i else s,
        "index": lambda s, i: s[i],
    }

    def __init__(self, root, dot, variables):
        self.root, self.dot, self.vars = root, dot, variables

    def expr(self, toks: list[str]):
        value, rest = self._call(toks)
        if rest:
            raise ValueError(f"trailing {rest}")
        return value

    def _call(self, toks):
        if toks and toks[0] in self.FUNCS:
            name, toks = toks[0], toks[1:]
            args = []
            while toks and toks[0] != ")":
                value, toks = self._term(toks)
                args.append(value)
            return self.FUNCS[name](*args), toks
        return self._term(toks)

    def _term(self, toks):
        tok, rest = toks[0], toks[1:]
        if tok == "(":
            value, rest = self._call(rest)
            if not rest or rest[0] != ")":
                raise ValueError("unbalanced (")
            rest = rest[1:]
            if rest and rest[0].startswith(".") and rest[0] != ".":
                value, rest = _field(value, rest[0][1:].split(".")), rest[1:]
            return value, rest
        if tok.startswith('"'):
            return bytes(tok[1:-1], "utf-8").decode("unicode_escape"), rest
        if re.fullmatch(r"-?\d+", tok):
            return int(tok), rest
        if tok == ".":
            return self.dot, rest
        if tok.startswith("."):
            return _field(self.dot, tok[1:].split(".")), rest
        if tok.startswith("$"):
            head, *path = tok.split(".")
            base = self.root if head == "$" else self.vars[head]
            return _field(base, path), rest
        raise ValueError(f"unknown token {tok!r}")


def _parse(items, i=0, stop=("end",)):
    """Nodes until an action in ``stop``; returns (nodes, index of the stopping action)."""
    nodes = []
    while i < len(items):
        kind, body = items[i]
        if kind == "text":
            nodes.append(("text", body))
            i += 1
            continue
        head = body.split()[0] if body else ""
        if head in stop or body.startswith("else"):
            return nodes, i
        if head in ("if", "range"):
            branches, i = [], i
            cond = body[len(head):].strip()
            while True:
                block, j = _parse(items, i + 1)
                branches.append((cond, block))
                end_body = items[j][1]
                i = j
                if end_body == "end":
                    break
                cond = end_body[len("else if"):].strip() if end_body.startswith("else if") else None
            nodes.append((head, branches))
            i += 1
            continue
        nodes.append(("action", body))
        i += 1
    return nodes, i


def _run(nodes, root, dot, variables, out):
    for node in nodes:
        kind = node[0]
        if kind == "text":
            out.append(node[1])
        elif kind == "action":
            m = re.fullmatch(r"(\$\w+)\s*:?=\s*(.*)", node[1], re.S)
            if m:
                variables[m.group(1)] = _Eval(root, dot, variables).expr(_tokens(m.group(2)))
            else:
                out.append(str(_Eval(root, dot, variables).expr(_tokens(node[1]))))
        elif kind == "if":
            for cond, block in node[1]:
                if cond is None or _Eval(root, dot, variables).expr(_tokens(cond)):
                    _run(block, root, dot, dict(variables), out)
                    break
        elif kind == "range":
            (header, block), = node[1]
            m = re.fullmatch(r"(\$\w+)\s*,\s*(\$\w+)\s*:=\s*(.*)", header, re.S)
            names, expr = ((m.group(1), m.group(2)), m.group(3)) if m else (None, header)
            for index, item in enumerate(_Eval(root, dot, variables).expr(_tokens(expr))):
                scope = dict(variables)
                if names:
                    scope[names[0]], scope[names[1]] = index, item
                _run(block, root, item, scope, out)


def render(template: str, data: dict) -> str:
    nodes, i = _parse(_lex(template))
    if i != len(_lex(template)):
        raise ValueError("unbalanced end")
    out: list[str] = []
    _run(nodes, data, data, {}, out)
    return "".join(out)
