"""The training config's pydantic schema as form fields, and form values back into a validated config.

:func:`form_fields` walks :class:`tunelab.config.TuneConfig` the way :func:`tunelab.config.describe_schema`
does (same paths, type names and defaults: ``tests/test_ui_form.py`` checks they agree) and says which
widget each field gets: a choice for ``Literal``, a switch for ``bool``, a number for ``int`` / ``float``,
text for ``str``, and YAML text for everything else (lists, mappings, optional sections). Method options
are per method (``method[lora].r``). :func:`config_tree` turns the values back into the sparse config
mapping (only what differs from the defaults), :func:`validate` runs it through
:func:`tunelab.config.load_config` (so the UI shows the CLI's one-line problems, word for word) and
checks that every path in it stays in the workspace.
"""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

import yaml
from pydantic import BaseModel

from tunelab.config import TuneConfig, load_config, set_path
from tunelab.errors import ConfigError, UserError
from tunelab.methods import METHODS
from tunelab.ui.workspace import Workspace

REQUIRED = "required"
"""The default of a field the config must set (``model.path``, ``data.train``)."""


@dataclass(frozen=True)
class FormField:
    """One input of the Train tab's form."""

    path: str  # the config path as describe_schema writes it ("train.lr", "method[lora].r")
    type_name: str  # describe_schema's type name
    default: Any  # the default value (JSON-like), or REQUIRED
    kind: Literal["choice", "bool", "int", "float", "text", "yaml"]
    help: str
    choices: tuple = ()
    optional: bool = False  # None is allowed (an empty box)

    @property
    def section(self) -> str:
        """The first path component: the form's accordion (``method[lora]`` for a method's options)."""
        return self.path.split(".")[0]

    @property
    def method(self) -> str | None:
        """The method whose option this is, or None."""
        head = self.section
        return head[len("method["):-1] if head.startswith("method[") else None

    @property
    def default_repr(self) -> str:
        """The default as describe_schema prints it."""
        return REQUIRED if self.default is REQUIRED else repr(self.default)


def unwrap_optional(ann: Any) -> tuple[Any, bool]:
    args = typing.get_args(ann)
    if typing.get_origin(ann) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else ann), True
    return ann, False


def widget_kind(ann: Any) -> tuple[str, tuple, bool]:
    """(kind, choices, optional) of a field's annotation."""
    inner, optional = unwrap_optional(ann)
    if typing.get_origin(inner) is Literal:
        return "choice", tuple(typing.get_args(inner)), optional
    if inner is bool:
        return "bool", (), optional
    if inner is int:
        return "int", (), optional
    if inner is float:
        return "float", (), optional
    if inner is str:
        return "text", (), optional
    return "yaml", (), optional


def form_fields(model: type[BaseModel] = TuneConfig, prefix: str = "") -> list[FormField]:
    """Every field of the config schema (describe_schema's rows) as a form input."""
    out: list[FormField] = []
    for name, field in model.model_fields.items():
        path, ann = f"{prefix}{name}", field.annotation
        if name == "method" and model is TuneConfig:
            out.append(FormField("method.name", "Literal", "lora", "choice", "The tuning method.", tuple(METHODS)))
            for mname, module in METHODS.items():
                out.extend(form_fields(module.Config, f"method[{mname}]."))
            continue
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out.extend(form_fields(ann, path + "."))
            continue
        if name == "name" and prefix.startswith("method["):
            continue
        inner = [a for a in typing.get_args(ann) if isinstance(a, type) and issubclass(a, BaseModel)]
        if inner:  # a list of sections (data.train) or an optional section (data.prepare): YAML text
            doc = field.description or ""
            keys = ", ".join(inner[0].model_fields)
            default = REQUIRED if field.is_required() else _plain(field.get_default(call_default_factory=True))
            out.append(FormField(path, "list", default, "yaml",
                                 f"{doc} Keys: {keys}.".strip(), optional=not field.is_required()))
            continue
        default = REQUIRED if field.is_required() else field.get_default(call_default_factory=True)
        type_name = getattr(ann, "__name__", None) or str(ann).replace("typing.", "")
        kind, choices, optional = widget_kind(ann)
        out.append(FormField(path, type_name, _plain(default), kind, field.description or "", choices, optional))
    return out


def _plain(value: Any) -> Any:
    """A default as plain data (pydantic models dumped, tuples as lists for YAML)."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    return value


def _jsonish(value: Any) -> Any:
    """Tuples as lists (YAML text and widget values hold lists)."""
    return list(value) if isinstance(value, tuple) else value


def shown_value(f: FormField) -> Any:
    """What the form shows before the user types anything."""
    if f.default is REQUIRED:
        return "" if f.kind in ("yaml", "text") else None
    if f.kind == "yaml":
        return "" if f.default in (None, [], {}) else yaml.safe_dump(_jsonish(f.default), default_flow_style=True,
                                                                      allow_unicode=True).strip()
    if f.default is None and f.kind != "choice":
        return ""  # an empty box (optional numbers are text boxes: a number box cannot be empty)
    return f.default


def parse_value(f: FormField, raw: Any) -> Any:
    """A widget's value as the config value; a one-line UserError naming the field when it cannot be."""
    if f.kind == "yaml":
        if isinstance(raw, list | dict | tuple):
            return _jsonish(raw)
        text = (raw or "").strip()
        if not text:  # an empty box: the default (a required field stays missing)
            return None if f.default is REQUIRED else f.default
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise UserError(f"{f.path}: not valid YAML ({getattr(err, 'problem', err)}) (got {text[:40]!r}). "
                            "Fix the value") from None
    if f.kind == "text":
        text = "" if raw is None else str(raw)
        return None if (f.optional and not text.strip()) else text
    if f.kind in ("int", "float"):
        if raw is None or (isinstance(raw, str) and not raw.strip()):
            return None
        if isinstance(raw, str):  # an optional number is a text box (empty: None)
            try:
                raw = yaml.safe_load(raw)
            except yaml.YAMLError:
                pass
            if not isinstance(raw, int | float) or isinstance(raw, bool):
                raise UserError(f"{f.path}: expected a number or an empty box (got {raw!r}). Fix the value")
        if f.kind == "int" and isinstance(raw, float) and raw.is_integer():
            return int(raw)
        return raw
    if f.kind == "choice" and raw in ("", None) and f.optional:
        return None
    return raw


def config_path(f: FormField) -> str:
    """The dotted config key (``method[lora].r`` -> ``method.r``)."""
    return "method." + f.path.split(".", 1)[1] if f.method else f.path


def config_tree(fields: list[FormField], values: dict[str, Any]) -> dict[str, Any]:
    """The config mapping the form describes: each value that differs from its default (and the required
    ones); method options only for the chosen method."""
    tree: dict[str, Any] = {}
    method = values.get("method.name") or "lora"
    for f in fields:
        if f.method is not None and f.method != method:
            continue
        value = parse_value(f, values.get(f.path, shown_value(f)))
        if f.default is not REQUIRED and _jsonish(value) == _jsonish(f.default):
            continue
        if f.default is REQUIRED and value in (None, "", []):
            continue  # load_config says it is missing, in the CLI's words
        set_path(tree, config_path(f), value)
    if method != "lora" or "method" in tree:
        tree.setdefault("method", {})
        tree["method"] = {"name": method, **{k: v for k, v in tree["method"].items() if k != "name"}}
    return tree


def to_yaml(tree: dict[str, Any]) -> str:
    """The config as the YAML file ``tunelab train`` reads."""
    order = list(TuneConfig.model_fields)
    ordered = {k: tree[k] for k in sorted(tree, key=lambda k: order.index(k) if k in order else len(order))}
    return yaml.safe_dump(ordered, sort_keys=False, allow_unicode=True)


#: Config keys that hold a path the trainer reads or writes (checked against the workspace).
_PATH_KEYS = ("run.output_dir",)


def workspace_problems(tree: dict[str, Any], ws: Workspace) -> list[str]:
    """Paths in the config that leave the workspace, one line each."""
    problems: list[str] = []
    checks = [(key, _get(tree, key)) for key in _PATH_KEYS]
    for section in ("train", "eval"):
        for i, spec in enumerate(_get(tree, f"data.{section}") or []):
            if isinstance(spec, dict) and "path" in spec:
                checks.append((f"data.{section}.{i}.path", spec["path"]))
    model = _get(tree, "model.path")
    if isinstance(model, str) and (model.startswith((".", "/", "~")) or (ws.root / model).exists()):
        checks.append(("model.path", model))  # a folder or file; aliases and hub ids are not paths
    for key, value in checks:
        if value is None:
            continue
        try:
            ws.resolve(str(value), key)
        except UserError as err:
            problems.append(str(err))
    return problems


def _get(tree: dict[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def validate(tree: dict[str, Any], ws: Workspace) -> list[str]:
    """The problems of a config, one line each: the workspace's, then load_config's (the CLI's lines)."""
    problems = workspace_problems(tree, ws)
    try:
        load_config(None, base=tree)
    except ConfigError as err:
        problems += err.problems
    except UserError as err:
        problems.append(str(err))
    return problems


def form_values(fields: list[FormField], tree: dict[str, Any]) -> dict[str, Any]:
    """The widget values that show a config mapping (an existing run's config.yaml, re-attached)."""
    method = _get(tree, "method.name") or "lora"
    values: dict[str, Any] = {}
    for f in fields:
        value = _get(tree, config_path(f)) if (f.method in (None, method)) else None
        if value is None:
            values[f.path] = shown_value(f)
        elif f.kind == "yaml":
            values[f.path] = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True).strip()
        else:
            values[f.path] = value
    values["method.name"] = method
    return values
