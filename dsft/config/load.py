"""Read a recipe file, apply `--set` overrides, validate, and word every error as its fix."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from dsft.config.schema import Recipe, recipe_model
from dsft.errors import DsftError, shown

MERGE_TAG = "tag:yaml.org,2002:merge"
MAX_VALUES = 100_000  # a recipe holds dozens; more means YAML aliases expanding (the "billion laughs")
MAX_DEPTH = 64
SCRATCH = "x-"  # top-level keys starting so hold YAML anchors only (as in Docker Compose files)


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (YAML would keep the last silently). Merge
    keys (`<<: *defaults`) work as in YAML: a key written in the mapping overrides a merged one."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == MERGE_TAG:
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}; keep one of them",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str) -> Any:
    """YAML text as data; nesting too deep for the parser is a YAMLError like any other syntax problem."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except RecursionError:
        raise yaml.YAMLError("nested too deeply to read") from None


def check_document(data: Any, where: str) -> None:
    """A recipe is small, shallow text: refuse aliases that expand it past MAX_VALUES values, nesting past
    MAX_DEPTH levels, and strings that are not text (a lone UTF-16 surrogate from a `\\ud800` escape), each
    named by its dotted key."""
    count, stack = 0, [("", data, 0)]
    while stack:
        at, value, depth = stack.pop()
        count += 1
        if count > MAX_VALUES:
            raise DsftError(f"{where}: the recipe expands to more than {MAX_VALUES:,} values through YAML aliases "
                            "(`*name`); a recipe is small: write the values out, or use fewer aliases")
        if depth > MAX_DEPTH:
            raise DsftError(f"{where}: {at or 'the recipe'} is nested more than {MAX_DEPTH} levels deep; a recipe has "
                            "sections of keys: fix the nesting")
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise DsftError(f"{where}: {at or 'the recipe'}: holds a lone UTF-16 surrogate (a `\\ud800`-style escape "
                                "without its pair), which is not text; write the character itself") from None
        elif isinstance(value, dict):
            stack += [(f"{at}.{k}" if at else str(k), v, depth + 1) for k, v in value.items()]
        elif isinstance(value, list):
            stack += [(f"{at}[{i}]", v, depth + 1) for i, v in enumerate(value)]


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
    check_document(data, str(path))
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
    if given:
        check_document(data, f"{path} with --set")
    for key in [k for k in data if isinstance(k, str) and k.startswith(SCRATCH)]:
        del data[key]  # `x-defaults: &d {...}`: a place for anchors to merge (`<<: *d`), not a recipe section
    recipe = validate_recipe(data, source=str(path), check_files=check_files, overrides=given)
    if check_files:
        resolve_hub_data(recipe)
    if check_files:  # a run directory reached through a symbolic link is written at its target
        import os

        from dsft.outputs import resolve_output

        target = resolve_output(recipe.output_dir, "output_dir")
        if target != Path(os.path.abspath(recipe.output_dir)):
            recipe.output_dir = str(target)
    return recipe


def resolve_hub_data(recipe: Recipe) -> None:
    """data.train / data.eval's Hub datasets (dsft.hub) as the local files of their split, in place: each file
    takes its entry's share, format and columns, and data.sources records where it came from. A share (weight,
    rows) of a split held in several files is refused: the shares are per file."""
    from dsft.hub import dataset_files, parse_data_uri

    d = recipe.data
    if not any(parse_data_uri(p) for p in [*d.train, *d.eval]):
        return
    sources: dict[str, dict[str, Any]] = {}

    def expand(paths: list[str], mix: list[Any], split: str, defaults: tuple[str, ...]) -> tuple[list[str], list[Any]]:
        files, records = [], []
        for i, (path, record) in enumerate(zip(paths, mix)):
            hub = parse_data_uri(path)
            if hub is None:
                files.append(path)
                records.append(record)
                continue
            found, source = dataset_files(hub["repo"], hub["split"], hub["name"], hub["revision"], f"data.{split}[{i}]",
                                          defaults)
            if record and ("weight" in record or "rows" in record) and len(found) > 1:
                raise DsftError(f"data.{split}[{i}]: {hub['repo']} split {source['split']} is {len(found)} files, and a "
                                "share (weight, rows) is per file; list its files as entries of their own, or leave the "
                                "share out")
            for f in found:
                files.append(f)
                records.append(record)
                sources[f] = source
        return files, records

    train, mix = expand(d.train, d.mix or [None] * len(d.train), "train", ("train",))
    d.eval, _ = expand(d.eval, [None] * len(d.eval), "eval", ("validation", "test"))
    d.train, d.mix, d.sources = train, (mix if any(mix) else None), sources


def validate_recipe(data: dict[str, Any], source: str, check_files: bool = False,
                    overrides: dict[str, str] | None = None) -> Recipe:
    try:
        return recipe_model().model_validate(data, context={"check_files": check_files})
    except ValidationError as e:
        lines = [f"{_source(err, source, overrides or {})}: {describe(err)}" for err in e.errors()]
        raise DsftError(*lines) from None


def _source(err: dict[str, Any], source: str, overrides: dict[str, str]) -> str:
    """The recipe file, or `--set KEY=VALUE` when the value at fault came from it."""
    path = ".".join(str(p) for p in err["loc"])
    for key, item in overrides.items():
        if path == key or path.startswith(key + ".") or key.startswith(path + "."):  # `--set traning.lr`: traning
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
    import typing

    model: type[BaseModel] | None = recipe_model()
    for part in loc[:-1]:
        field = model.model_fields.get(part) if model and isinstance(part, str) else None
        ann = field.annotation if field else None
        ann = next((a for a in typing.get_args(ann) if isinstance(a, type) and issubclass(a, BaseModel)), ann)
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return list(model.model_fields) if model else []


# keys of transformers' TrainingArguments, PEFT, Axolotl and LLaMA-Factory, and what dsft calls them
ALIASES = {
    "learning_rate": "training.lr", "lr_scheduler_type": "training.scheduler", "lr_scheduler": "training.scheduler",
    "num_train_epochs": "training.epochs", "num_epochs": "training.epochs",
    "gradient_accumulation_steps": "training.grad_accum", "per_device_train_batch_size": "training.micro_batch_size",
    "micro_batch_size": "training.micro_batch_size", "gradient_checkpointing": "training.activation_checkpointing",
    "load_in_4bit": "model.quantization: nf4", "quantization_bit": "model.quantization: nf4",
    "cutoff_len": "data.max_length", "max_seq_length": "data.max_length", "sequence_len": "data.max_length",
    "max_length": "data.max_length", "lora_r": "adapter.r", "lora_rank": "adapter.r", "lora_alpha": "adapter.alpha",
    "lora_dropout": "adapter.dropout", "lora_target_modules": "adapter's groups (attention, shared_experts, ...)",
    "model_name_or_path": "model.path", "base_model": "model.path", "dataset": "data.train", "datasets": "data.train",
    "bf16": "model.dtype: bfloat16", "torch_dtype": "model.dtype", "seed": "training.seed",
}

# keys dsft once read, and what replaced them
GONE = {
    "model.shard_experts": "gone; each rank holds 1/N of the routed experts with training.parallel: {ep: N} (FSDP2 + "
                           "expert parallelism, every objective; docs/multi-gpu.md): remove model.shard_experts and set it",
}

_TYPE_WORDS = {
    "int": "an integer", "float": "a number", "bool": "true or false", "string": "a string",
    "dict": "a mapping", "model": "a mapping", "list": "a list",
}


def describe(err: dict[str, Any]) -> str:
    """One error as `dotted.path: what to do`."""
    loc = tuple(err["loc"])
    path = ".".join(str(p) for p in loc)
    kind, ctx = err["type"], err.get("ctx", {})
    if kind == "extra_forbidden" and path in GONE:
        what = GONE[path]
    elif kind == "extra_forbidden":
        keys = _section_keys(loc)
        import difflib

        close = difflib.get_close_matches(str(loc[-1]), keys, n=1, cutoff=0.6) if loc else []
        alias = ALIASES.get(str(loc[-1])) if loc else None
        if alias:
            what = f"unknown key; dsft's is {alias} (the name other tools use for it is not read)"
        elif close:
            what = f"unknown key; did you mean {close[0]}?"
        else:
            what = "unknown key; remove it" + (f" (valid keys here: {', '.join(keys)})" if keys else "")
    elif kind == "missing":
        what = "required; add it"
    elif kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        op = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}[kind]
        bound = next(iter(ctx.values()))
        what = f"must be {op} {bound} (got {shown(err['input'])})"
    elif kind == "finite_number":
        what = f"must be a finite number (got {shown(err['input'])})"
    elif kind == "literal_error":
        what = f"must be one of {ctx['expected']} (got {shown(err['input'])})"
    elif kind.endswith(("_parsing", "_type")):
        wanted = _TYPE_WORDS.get(kind.split("_")[0], kind.split("_")[0])
        what = f"must be {wanted} (got {shown(err['input'])})"
    elif kind == "value_error":
        what = str(ctx.get("error", err["msg"]))
        # a section's own validator naming one of its keys first (`train[0].weight: ...`): one dotted path
        head = re.match(r"^([A-Za-z_]\w*)[.\[:]", what)
        if path and head and head.group(1) in _section_keys((*loc, "")):
            return f"{path}.{what}"
    else:
        what = err["msg"]
    return f"{path}: {what}" if path else what
