"""Read a recipe file, apply `--set` overrides, validate, and word every error as its fix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from dsft.config.schema import Recipe
from dsft.errors import DsftError


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (YAML would keep the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}; keep one of them",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def read_yaml(path: Path, what: str = "recipe file") -> dict[str, Any]:
    if not path.is_file():
        raise DsftError(f"{path}: {what} not found" if not path.exists() else f"{path}: not a file; give the {what}")
    try:
        data = parse_yaml(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise DsftError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); "
                        "save it as UTF-8") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise DsftError(f"{where}: not valid YAML ({getattr(e, 'problem', e)}); fix the syntax") from None
    if not isinstance(data, dict):
        raise DsftError(f"{path}: a recipe is a YAML mapping with sections model, data, adapter, training, output_dir")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, str]:
    """Apply `section.key=value` overrides in place; values are parsed as YAML (`1e-4`, `true`, `[a, b]`).
    Returns each overridden dotted key with its `--set` item, to name it as the source of an error."""
    given: dict[str, str] = {}
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
        try:
            node[leaf] = parse_yaml(raw) if raw else ""
        except yaml.YAMLError as e:
            raise DsftError(f"--set {item!r}: the value is not valid YAML ({getattr(e, 'problem', e)}); "
                            f"quote it (--set '{key}=\"...\"') or fix the brackets") from None
        given[key] = item
    return given


def load_recipe(path: Path, overrides: list[str] | None = None, check_files: bool = False) -> Recipe:
    data = read_yaml(path)
    given = apply_overrides(data, overrides or [])
    return validate_recipe(data, source=str(path), check_files=check_files, overrides=given)


def validate_recipe(data: dict[str, Any], source: str, check_files: bool = False,
                    overrides: dict[str, str] | None = None) -> Recipe:
    try:
        return Recipe.model_validate(data, context={"check_files": check_files})
    except ValidationError as e:
        lines = [f"{_source(err, source, overrides or {})}: {describe(err)}" for err in e.errors()]
        raise DsftError(*lines) from None


def _source(err: dict[str, Any], source: str, overrides: dict[str, str]) -> str:
    """The recipe file, or `--set KEY=VALUE` when the value at fault came from it."""
    path = ".".join(str(p) for p in err["loc"])
    for key, item in overrides.items():
        if path == key or path.startswith(key + "."):
            return f"--set {item}"
    return source


def load_run_recipe(run: Path) -> Recipe:
    """A run's resolved recipe.yaml, read back through the schema (files are not re-checked)."""
    path = run / "recipe.yaml"
    if not path.is_file():
        raise DsftError(f"{run}: no recipe.yaml; not a dsft run directory, or not a finished dsft run (point at the "
                        "run's output_dir)")
    return validate_recipe(read_yaml(path, "run recipe"), source=str(path))


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
    elif kind == "finite_number":
        what = f"must be a finite number (got {err['input']!r})"
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
