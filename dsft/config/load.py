"""Read a recipe file, apply `--set` overrides, validate, and word every error as its fix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from dsft.config.schema import Recipe
from dsft.errors import DsftError


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DsftError(f"{path}: recipe file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise DsftError(f"{where}: not valid YAML ({getattr(e, 'problem', e)}); fix the syntax") from None
    if not isinstance(data, dict):
        raise DsftError(f"{path}: a recipe is a YAML mapping with sections model, data, adapter, training, output_dir")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` overrides; values are parsed as YAML (`1e-4`, `true`, `[a, b]`)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise DsftError(f"--set {item!r}: write it as section.key=value, e.g. --set training.lr=1e-4")
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise DsftError(f"--set {item!r}: {part} is not a section")
            node = child
        node[leaf] = yaml.safe_load(raw) if raw else ""
    return data


def load_recipe(path: Path, overrides: list[str] | None = None, check_files: bool = False) -> Recipe:
    data = apply_overrides(read_yaml(path), overrides or [])
    return validate_recipe(data, source=str(path), check_files=check_files)


def validate_recipe(data: dict[str, Any], source: str, check_files: bool = False) -> Recipe:
    try:
        return Recipe.model_validate(data, context={"check_files": check_files})
    except ValidationError as e:
        lines = [f"{source}: {describe(err)}" for err in e.errors()]
        raise DsftError(*lines) from None


def _section_keys(loc: tuple) -> list[str]:
    model: type[BaseModel] | None = Recipe
    for part in loc[:-1]:
        field = model.model_fields.get(part) if model and isinstance(part, str) else None
        ann = field.annotation if field else None
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return list(model.model_fields) if model else []


_TYPE_WORDS = {
    "int": "an integer", "float": "a number", "bool": "true or false", "string": "a string",
    "dict": "a mapping", "model": "a mapping", "list": "a list",
}


def describe(err: dict[str, Any]) -> str:
    """One error as `dotted.path: what to do`."""
    loc = tuple(err["loc"])
    path = ".".join(str(p) for p in loc)
    kind, ctx = err["type"], err.get("ctx", {})
    if kind == "extra_forbidden":
        keys = _section_keys(loc)
        what = "unknown key; remove it" + (f" (valid keys here: {', '.join(keys)})" if keys else "")
    elif kind == "missing":
        what = "required; add it"
    elif kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        op = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}[kind]
        bound = next(iter(ctx.values()))
        what = f"must be {op} {bound} (got {err['input']!r})"
    elif kind == "literal_error":
        what = f"must be one of {ctx['expected']} (got {err['input']!r})"
    elif kind.endswith(("_parsing", "_type")):
        wanted = _TYPE_WORDS.get(kind.split("_")[0], kind.split("_")[0])
        what = f"must be {wanted} (got {err['input']!r})"
    elif kind == "value_error":
        what = str(ctx.get("error", err["msg"]))
    else:
        what = err["msg"]
    return f"{path}: {what}" if path else what
