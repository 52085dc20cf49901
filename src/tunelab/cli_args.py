"""Command-line options from a pydantic model: one argparse argument per field, parsed back into the model.

A verb's options are a pydantic model (``CleanOptions``, ``PredictOptions``...). :func:`add_options`
adds one argument per field to an argparse (sub)parser, and :func:`parse_options` turns the parsed
arguments back into the model, so the model's types, defaults and constraints are the only
definition of the flags:

* the flag is the field name with dashes (``max_new_tokens`` -> ``--max-new-tokens``);
* ``int`` / ``float`` / ``str`` / ``Path`` fields take one value of that type (argparse converts it,
  so ``--kfold x`` is argparse's one-line "invalid int value" error);
* ``Literal[...]`` and ``Enum`` fields list their values as argparse choices;
* a ``bool`` field defaulting to False is a ``--x`` switch; one defaulting to True is ``--no-x``;
* a list or tuple field is comma-separated (``--ratios 0.7,0.15,0.15``) unless its metadata asks
  for ``nargs`` (space-separated values) or ``repeat`` (the flag given several times);
* the help text is the field's ``description`` (plus its default);
* a field is a positional argument, or otherwise shaped, through its metadata:
  ``Field(..., json_schema_extra={"cli": "positional"})``, or a dict
  ``{"cli": {"positional": True, "nargs": "+", "repeat": True, "flag": "--other-name",
  "metavar": "FILE", "help": "CLI-specific help"}}``; ``{"cli": "skip"}`` leaves a field out.

:func:`parse_options` validates with the model; a validation error becomes one
:class:`~tunelab.errors.UserError` line naming the flag and the text the user typed, e.g.
``--ratios: ratios must be ... summing to 1 (got '0.9,0.9,-0.8'). See `tunelab data split --help`.``
"""

from __future__ import annotations

import argparse
import copy
import enum
import re
import types
import typing
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from tunelab.errors import UserError

__all__ = ["POSITIONAL", "add_options", "cli_fields", "field_of", "flag_of", "parse_options"]

POSITIONAL = {"cli": "positional"}
"""``json_schema_extra`` of a field that is a positional argument."""


def field_of(model: type[BaseModel], name: str, **changes: Any) -> FieldInfo:
    """A copy of ``model``'s field ``name`` (its constraints and description) with ``changes``
    (``default=...``, ``description=...``, ``json_schema_extra=...``): a verb's options reuse a
    settings model's field instead of repeating it."""
    return FieldInfo.merge_field_infos(copy.copy(model_fields(model)[name]), **changes)


def model_fields(model: type) -> dict[str, FieldInfo]:
    """The fields of a pydantic model or pydantic dataclass."""
    return getattr(model, "model_fields", None) or model.__pydantic_fields__


# ----------------------------------------------------------------------------- reading a field


class _Spec(typing.NamedTuple):
    name: str
    field: FieldInfo
    meta: dict[str, Any]
    base: Any  # the annotation without Optional
    kind: str  # "bool", "list" or "scalar"
    item: Any  # the element type of a list, else the scalar type


def _meta(field: FieldInfo) -> dict[str, Any]:
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    cli = extra.get("cli", {})
    if isinstance(cli, str):
        return {cli: True}
    return dict(cli)


def _strip_optional(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _spec(name: str, field: FieldInfo) -> _Spec:
    base = _strip_optional(field.annotation)
    origin = typing.get_origin(base)
    if base is bool:
        return _Spec(name, field, _meta(field), base, "bool", bool)
    if origin in (list, tuple, set, frozenset, Sequence, typing.Sequence):
        args = [a for a in typing.get_args(base) if a is not Ellipsis]
        return _Spec(name, field, _meta(field), base, "list", _strip_optional(args[0]) if args else str)
    return _Spec(name, field, _meta(field), base, "scalar", base)


def cli_fields(model: type[BaseModel]) -> list[_Spec]:
    """The fields of ``model`` that are command-line arguments, in declaration order."""
    return [_spec(n, f) for n, f in model_fields(model).items() if not _meta(f).get("skip")]


def _choices(tp: Any) -> list | None:
    if typing.get_origin(tp) is Literal:
        return list(typing.get_args(tp))
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return [m.value for m in tp]
    return None


def _converter(tp: Any):
    """The argparse ``type`` of one value (its error names the type: ``invalid int value``)."""
    choices = _choices(tp)
    if choices:
        return type(choices[0]) if all(type(c) is type(choices[0]) for c in choices) else None
    return tp if tp in (int, float) else None


def flag_of(spec: _Spec) -> str:
    """How the user writes this field: ``--out-dir``, ``--no-stratify``, or a positional's name."""
    if spec.meta.get("positional"):
        return spec.meta.get("metavar") or spec.name
    if spec.meta.get("flag"):
        return spec.meta["flag"]
    dashed = spec.name.replace("_", "-")
    if spec.kind == "bool" and spec.field.default is True:
        return f"--no-{dashed}"
    return f"--{dashed}"


def _default_text(spec: _Spec) -> str:
    if spec.field.is_required():
        return ""
    d = spec.field.get_default(call_default_factory=True)
    if d is None or d is False or d == () or d == [] or spec.kind == "bool":
        return ""
    if spec.kind == "list":
        d = (" " if spec.meta.get("nargs") else ",").join(str(x) for x in d)
    elif isinstance(d, enum.Enum):
        d = d.value
    return f"default {d}"


def _help(spec: _Spec) -> str:
    text = spec.meta.get("help") or (spec.field.description or "").strip()
    notes = []
    if spec.kind == "bool" and spec.field.default is True:
        notes.append("on unless this flag is given")
    elif spec.kind == "list" and not (spec.meta.get("nargs") or spec.meta.get("repeat")):
        notes.append("comma-separated")
    elif spec.meta.get("repeat"):
        notes.append("repeatable")
    if "default" not in text.lower() and _default_text(spec):
        notes.append(_default_text(spec))
    if notes:
        text = f"{text} ({'; '.join(notes)})" if text else "; ".join(notes)
    return text.replace("%", "%%")


# ----------------------------------------------------------------------------- building and parsing


def add_options(parser: argparse.ArgumentParser, model: type[BaseModel]) -> None:
    """Add an argument to ``parser`` for each field of ``model`` (see the module docstring).

    Arguments the user does not give stay out of the namespace (``argparse.SUPPRESS``), so the
    model's own defaults apply and :func:`parse_options` knows which values were typed."""
    for spec in cli_fields(model):
        kw: dict[str, Any] = {"help": _help(spec), "default": argparse.SUPPRESS}
        if spec.meta.get("metavar"):
            kw["metavar"] = spec.meta["metavar"]
        elif spec.meta.get("flag") and spec.kind != "bool":
            kw["metavar"] = spec.meta["flag"].lstrip("-").replace("-", "_").upper()
        separated = spec.kind == "list" and not (spec.meta.get("nargs") or spec.meta.get("repeat"))
        if spec.kind == "bool":
            kw["action"] = "store_false" if spec.field.default is True else "store_true"
        elif separated:  # one text, split at commas and validated by the model in parse_options
            kw["metavar"] = kw.get("metavar") or spec.name.upper()
        else:
            if _choices(spec.item):
                kw["choices"] = _choices(spec.item)
            if _converter(spec.item) is not None:
                kw["type"] = _converter(spec.item)
            if spec.kind == "list" and spec.meta.get("nargs"):
                kw["nargs"] = spec.meta["nargs"]
            elif spec.meta.get("repeat"):
                kw["action"] = "append"
        if spec.meta.get("positional"):
            if spec.kind == "list" and "nargs" not in kw:
                kw["nargs"] = "+"
            parser.add_argument(spec.name, **kw)
        else:
            if spec.field.is_required():
                kw["required"] = True
            parser.add_argument(flag_of(spec), dest=spec.name, **kw)


def _message(err: ValidationError, model: type[BaseModel], specs: dict[str, _Spec], given: dict[str, Any],
             prog: str) -> str:
    first = err.errors()[0]
    loc = first["loc"]
    # A check of the whole model has no field: name the first option the user gave, else the first field.
    name = str(loc[0]) if loc and str(loc[0]) in specs else next(iter(given), next(iter(specs), ""))
    spec = specs.get(name)
    flag = flag_of(spec) if spec else name
    what = re.sub(r"\s*\(got [^)]*\)$", "", first["msg"].removeprefix("Value error, "))
    if spec and spec.kind == "list" and len(loc) > 1 and isinstance(loc[1], int) and isinstance(given.get(name), str):
        item = f"item {loc[1] + 1}: {first.get('input')!r}"  # one value of a comma-separated list
        what = (f"not a comma-separated list of numbers ({item})" if spec.item in (int, float)
                else f"{item}: {what}")
    got = given.get(name, first.get("input"))
    return f"{flag}: {what} (got {got!r}). See `{prog} --help`."


def parse_options(model: type[BaseModel], args: argparse.Namespace | dict[str, Any], *, prog: str = "tunelab"):
    """``model`` built from the parsed ``args`` (fields the user did not give keep their defaults).

    A validation error is raised as one :class:`UserError` line naming the flag and the value typed."""
    values = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    specs = {s.name: s for s in cli_fields(model)}
    given = {n: values[n] for n in specs if n in values}
    data = {}
    for name, value in given.items():
        spec = specs[name]
        if spec.kind == "list" and isinstance(value, str):  # comma-separated text
            value = [x.strip() for x in value.split(",") if x.strip()]
        data[name] = value
    try:
        return model(**data)
    except ValidationError as err:
        raise UserError(_message(err, model, specs, given, prog)) from None
