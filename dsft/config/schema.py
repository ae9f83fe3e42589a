"""The recipe schema: one pydantic model per section, unknown keys refused everywhere.

Field validators that touch the filesystem run only when validation is given
``context={"check_files": True}``, so ``dsft validate`` stays static by default and every error,
static or file-related, is still reported in one pass.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    ValidationInfo,
    field_validator,
    model_validator,
)

from dsft.data import MAX_MIX_ROWS
from dsft.errors import shown
from dsft.models.builtin import CONFIGS
from dsft.models.builtin import PREFIX as BUILTIN_PREFIX
BUILTIN_MODELS = tuple(CONFIGS)

# Strict: YAML's `true` or `.inf` is no count of anything (pydantic would take `true` as 1).
PositiveInt = Annotated[int, Strict(), Field(gt=0)]
NonNegInt = Annotated[int, Strict(), Field(ge=0)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)


def _checking_files(info: ValidationInfo) -> bool:
    return bool(info.context and info.context.get("check_files"))


class ModelSection(Section):
    """Which checkpoint to start from and how to hold it in memory."""

    path: str = Field(description="A local checkpoint directory, a Hugging Face Hub id (`deepseek-ai/DeepSeek-V2-Lite`: "
                      "resolved through the Hugging Face cache; fetched unless HF_HUB_OFFLINE is set), or "
                      "`builtin:tiny-deepseek-v3` / `builtin:tiny-deepseek-v2`.")
    revision: str | None = Field(None, description="With a Hub id: the branch, tag or commit (default: main); the commit "
                                 "used is recorded in run.json and the model card.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Compute dtype: `auto` is bfloat16 on GPU and float32 on CPU."
    )
    quantization: Literal["none", "nf4"] = Field("none", description="`nf4` holds the frozen base weights in 4-bit NF4 (QLoRA).")
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] = Field(
        "sdpa", description="Attention kernel passed to transformers."
    )
    shard_experts: bool = Field(
        False, description="With `nf4` on several processes: each rank keeps 1/N of the routed experts' NF4 codes "
        "and gathers a layer's codes when it runs, for models whose experts do not fit one GPU (DeepSeek-V3)."
    )

    @field_validator("path")
    @classmethod
    def _path(cls, v: str, info: ValidationInfo) -> str:
        if not v.strip():
            raise ValueError("empty; give a checkpoint directory or builtin:tiny-deepseek-v3")
        v = _expand(v)
        if v.startswith(BUILTIN_PREFIX):
            name = v[len(BUILTIN_PREFIX):]
            if name not in BUILTIN_MODELS:
                raise ValueError(f"unknown built-in model {name!r}; use one of: " + ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_MODELS))
            return v
        from dsft.hub import is_repo_id

        if _checking_files(info) and not is_repo_id(v):  # a hub id is resolved (and its files checked) in the preflight
            from dsft.models.files import check_model_dir

            check_model_dir(Path(v))
        return v

    @field_validator("revision")
    @classmethod
    def _revision(cls, v: str | None, info: ValidationInfo) -> str | None:
        from dsft.hub import is_repo_id

        path = info.data.get("path")
        if v is not None and (not v.strip() or not isinstance(path, str) or not is_repo_id(path)):
            raise ValueError("only with a Hugging Face Hub id in model.path (a branch, tag or commit of it); remove it"
                             if v.strip() else "empty; give a branch, tag or commit, or remove it")
        return v

    @field_validator("shard_experts")
    @classmethod
    def _shard_needs_nf4(cls, v: bool, info: ValidationInfo) -> bool:
        if v and info.data.get("quantization") != "nf4":
            raise ValueError("needs model.quantization: nf4 (for a bf16 base, shard with FSDP2: recipes/accelerate/fsdp2.yaml)")
        return v


class DataSection(Section):
    """Training data: files, their format, and how they become token sequences."""

    train: list[str] = Field(description="JSONL, Parquet or CSV files (a single path or a list). An entry may be a "
                             "mapping `{path: FILE, ...}` with: `weight: W`, the file's share of the mix's weighted rows "
                             "(files given weights share the rows they hold together: weights 3 and 1 give a 3:1 split of "
                             "it; sft), or `rows: N` (exactly N rows from the file; sft); `format: F`, the file's own "
                             "data.format (sft mixes of messages, sharegpt, alpaca... files); `columns: {FIELD: COLUMN}`, "
                             "the file's column that holds each field dsft reads (e.g. `{completion: response, label: "
                             "feedback}`; every objective).")
    mix: list[dict[str, Any] | None] | None = Field(
        None, exclude=True, description="Set by data.train's `{path, ...}` entries, one per file (not a key to write).")
    sources: dict[str, dict[str, Any]] | None = Field(
        None, exclude=True, description="Set by dsft: the Hub dataset, split and commit each resolved file came from.")
    eval: list[str] = Field(default_factory=list, description="Held-out files in the same format (optional).")
    format: str = Field(
        "messages",
        description="`messages` (chat turns), `prompt_completion` (`prompt`/`completion`), `alpaca` "
        "(`instruction`/`input`/`output`), `sharegpt` (`conversations` of `from`/`value`: human, gpt, system), `preference` (`prompt`/`chosen`/`rejected`: dpo, orpo, simpo, kto), "
        "`kto` (`prompt` or `messages`, `completion`, `label`: kto), `prompt` (`prompt` or `messages` ending in a user "
        "turn, other columns passed to the rewards: grpo), or a format an objective plug-in adds.",
    )
    max_length: PositiveInt = Field(1024, description="Sequences are truncated (or packed) to this many tokens.")
    packing: bool = Field(False, description="Pack several examples into each sequence (best with flash attention).")
    assistant_only_loss: bool = Field(True, description="Compute the loss on assistant tokens only.")
    system_prompt: str | None = Field(None, description="System message added to rows that have none.")
    chat_template: str | None = Field(
        None, description="A Jinja chat-template file to use instead of the tokenizer's own (saved with the run)."
    )
    num_proc: PositiveInt | None = Field(
        None, description="Processes that tokenize data the prepared-data cache does not hold yet (default: the "
        "machine's cores; inputs under 8 MiB are tokenized in one). Does not change the tokens."
    )

    def shares(self) -> list[dict[str, Any] | None] | None:
        """Per training file its share of a mix ({weight} or {rows}), or None when no file has one."""
        out = [{k: v for k, v in (m or {}).items() if k in ("weight", "rows")} or None for m in (self.mix or [])]
        return out if any(out) else None

    def file_formats(self) -> list[str]:
        """Per training file the data.format its rows are in (its entry's `format`, else data.format)."""
        return [(m or {}).get("format") or self.format for m in (self.mix or [None] * len(self.train))]

    def file_columns(self) -> list[dict[str, str] | None]:
        """Per training file its column map (`columns`), or None."""
        return [(m or {}).get("columns") for m in (self.mix or [None] * len(self.train))]

    @field_validator("format")
    @classmethod
    def _format(cls, v: str) -> str:
        if v not in FORMATS:
            raise ValueError(f"must be one of {', '.join(repr(f) for f in FORMATS)} (got {shown(v)})")
        return v

    @model_validator(mode="before")
    @classmethod
    def _mix_entries(cls, data: Any) -> Any:
        """`{path, weight | rows, format, columns}` entries of data.train: the path stays in train, the rest in mix."""
        if not isinstance(data, dict):
            return data
        for key in ("mix", "sources"):
            if key in data:
                raise ValueError(f"{key}: not a key to write; give a file's share, format or columns in its data.train "
                                 "entry {path: FILE, weight: W}")
        data = {**data, **{split: _hub_strings(data[split], split) for split in ("train", "eval") if split in data}}
        train = data.get("train")
        if not isinstance(train, list) or not any(isinstance(e, dict) for e in train):
            return data
        paths, mix = [], []
        for i, entry in enumerate(train):
            if not isinstance(entry, dict):
                paths.append(entry)
                mix.append(None)
                continue
            paths.append(_hub_entry(entry, f"train[{i}]") if "hub" in entry else entry.get("path"))
            mix.append(_train_entry({k: v for k, v in entry.items() if k not in HUB_KEYS} | {"path": paths[-1]}, i))
        return {**data, "train": paths, "mix": mix}

    @field_validator("train", "eval", mode="before")
    @classmethod
    def _listify(cls, v: Any) -> Any:
        v = [v] if isinstance(v, str) else v
        return [_expand(p) if isinstance(p, str) else p for p in v] if isinstance(v, list) else v

    @field_validator("train")
    @classmethod
    def _train_nonempty(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("list at least one training file")
        return v

    @field_validator("train", "eval")
    @classmethod
    def _files_exist(cls, v: list[str], info: ValidationInfo) -> list[str]:
        from dsft.hub import SCHEME

        if _checking_files(info):
            missing = [p for p in v if not p.startswith(SCHEME) and not Path(p).is_file()]
            if missing:
                raise ValueError(f"file not found: {', '.join(missing)} (paths are relative to the current directory)")
        return v

    @field_validator("chat_template")
    @classmethod
    def _template_exists(cls, v: str | None, info: ValidationInfo) -> str | None:
        v = _expand(v) if v is not None else v
        if v is not None and _checking_files(info) and not Path(v).is_file():
            raise ValueError(f"file not found: {v}")
        return v


class LoraGroup(Section):
    """LoRA on one group of modules. `true`/`false` is shorthand for `{enabled: true/false}`."""

    enabled: bool = True
    r: PositiveInt | None = Field(None, description="Rank for this group; defaults to `adapter.r`.")
    alpha: float | None = Field(None, gt=0, description="Scale numerator for this group; defaults to `adapter.alpha`.")

    @model_validator(mode="before")
    @classmethod
    def _from_bool(cls, v: Any) -> Any:
        return {"enabled": v} if isinstance(v, bool) else v


ENTRY_KEYS = ("path", "weight", "rows", "format", "columns")
HUB_KEYS = ("hub", "split", "name", "revision")


def _hub_entry(entry: dict, where: str) -> str:
    """A `{hub: OWNER/NAME, split, name, revision}` entry as its data_uri string (resolved in the preflight)."""
    from dsft.hub import REPO_ID, data_uri

    if "path" in entry:
        raise ValueError(f"{where}: give path (a local file) or hub (a Hugging Face dataset id), not both")
    repo = entry.get("hub")
    if not isinstance(repo, str) or not REPO_ID.match(repo):
        raise ValueError(f"{where}.hub: a Hugging Face dataset id OWNER/NAME (got {shown(repo)})")
    for key in ("split", "name", "revision"):
        if key in entry and (not isinstance(entry[key], str) or not entry[key].strip()):
            raise ValueError(f"{where}.{key}: a non-empty string (got {shown(entry[key])}), or leave it out")
    return data_uri(repo, entry.get("split"), entry.get("name"), entry.get("revision"))


def _hub_strings(value: Any, split: str) -> Any:
    """data.train / data.eval with every Hub id (`OWNER/NAME` that is no local file, or a `{hub: ...}` entry of
    data.eval) as its data_uri string."""
    from dsft.hub import data_uri, is_repo_id

    items = value if isinstance(value, list) else [value] if isinstance(value, str) else None
    if items is None:
        return value
    out = []
    for i, item in enumerate(items):
        if isinstance(item, str) and is_repo_id(_expand(item)):
            out.append(data_uri(item))
        elif split == "eval" and isinstance(item, dict) and "hub" in item:
            extra = sorted(set(map(str, item)) - set(HUB_KEYS))
            if extra:
                raise ValueError(f"eval[{i}]: a Hub entry of data.eval is {{hub, split, name, revision}} (unknown key "
                                 f"{extra[0]!r})")
            out.append(_hub_entry(item, f"eval[{i}]"))
        else:
            out.append(item)
    return out


def _train_entry(entry: dict, i: int) -> dict[str, Any]:
    """One `{path, ...}` entry of data.train as its mix record ({weight | rows, format, columns}), or the line
    saying what is wrong with it."""
    extra = sorted(set(map(str, entry)) - set(ENTRY_KEYS))
    if extra or "path" not in entry or not isinstance(entry["path"], str):
        raise ValueError(f"train[{i}]: an entry is {{path: FILE}} or {{hub: OWNER/NAME, split, name, revision}} with "
                         "any of weight, rows, format, columns"
                         + (f" (unknown key {extra[0]!r})" if extra else " (path missing)" if "path" not in entry else ""))
    if "weight" in entry and "rows" in entry:
        raise ValueError(f"train[{i}]: give weight (a share of the mix) or rows (a count), not both")
    record: dict[str, Any] = {}
    w = entry.get("weight")
    if "weight" in entry:
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 < w < float("inf"):
            raise ValueError(f"train[{i}].weight: a positive number (got {shown(w)}); weights 3 and 1 give the files a "
                             "3:1 share of the mix")
        record["weight"] = float(w)
    n = entry.get("rows")
    if "rows" in entry:
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_MIX_ROWS:
            raise ValueError(f"train[{i}].rows: a whole number of rows from 1 to {MAX_MIX_ROWS:,} (got {shown(n)})")
        record["rows"] = n
    if "format" in entry:
        if entry["format"] not in FORMATS:
            raise ValueError(f"train[{i}].format: must be one of {', '.join(repr(f) for f in FORMATS)} (got "
                             f"{shown(entry['format'])})")
        record["format"] = entry["format"]
    if "columns" in entry:
        columns = entry["columns"]
        if not isinstance(columns, dict) or not columns or not all(
                isinstance(k, str) and k.strip() and isinstance(v, str) and v.strip() for k, v in columns.items()):
            raise ValueError(f"train[{i}].columns: a mapping of the fields dsft reads to this file's columns, e.g. "
                             f"{{completion: response, label: feedback}} (got {shown(columns)})")
        if len(set(columns.values())) != len(columns):
            raise ValueError(f"train[{i}].columns: one column given for two fields ({shown(columns)})")
        record["columns"] = dict(columns)
    return record


def _parse_selection(v: Any) -> Any:
    """`none`, `all`, or `{layer: [expert ids]}` with integer layers and ids."""
    if v in ("none", "all"):
        return v
    if not isinstance(v, dict) or not v:
        raise ValueError("must be none, all, or a mapping {layer: [expert ids]} such as {1: [0, 3]}")
    out: dict[int, list[int]] = {}
    for layer, ids in v.items():
        layer_i = _index(layer)
        ids_i = {_index(i) for i in ids} if isinstance(ids, list) else set()
        if layer_i is None:
            raise ValueError(f"layer {shown(layer)}: layers are integers >= 0, e.g. {{1: [0, 3]}}")
        if not ids_i or None in ids_i:
            raise ValueError(f"layer {shown(layer)}: give a non-empty list of integer expert ids >= 0, e.g. "
                             f"{{{layer_i}: [0, 3]}} (got {shown(ids)})")
        out[layer_i] = sorted(ids_i)
    return out


def _index(value: Any) -> int | None:
    """A layer or expert number: an integer >= 0 (or its decimal string, as YAML keys may be); never a bool,
    a float or infinity."""
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _expand(path: str) -> str:
    """`~` and `~user` expanded, as a shell would (a recipe is not run through one)."""
    import os

    return os.path.expanduser(path) if path.startswith("~") else path


ROUTED_KEYS = {"experts", "policy", "top_p", "min_per_layer", "max_per_layer", "samples", "count", "mode", "r", "alpha",
               "profile_after"}


class RoutedExperts(Section):
    """LoRA (or full training) on routed experts, chosen explicitly or from the task's routing profile.
    Shorthand: `routed_experts: all` or `routed_experts: {1: [0, 3]}`."""

    experts: Any = Field("none", description="`none`, `all`, or `{layer: [expert ids]}` (leave out with `policy`).")
    policy: Literal["gate_score", "token_share"] | None = Field(
        None, description="Choose experts per layer from the routing profile of the training data (ESFT)."
    )
    top_p: float = Field(0.2, gt=0, le=1, description="With `policy`: per layer, the fewest experts whose share of the score reaches top_p.")
    min_per_layer: NonNegInt = Field(1, description="With `policy`: at least this many experts per layer.")
    max_per_layer: PositiveInt | None = Field(None, description="With `policy`: at most this many experts per layer.")
    samples: PositiveInt = Field(1000, description="With `policy`: training rows profiled (a seeded sample of distinct "
                                 "rows: a row a data mix repeats counts once); the profile's rows and time are in the plan.")
    profile_after: bool = Field(True, description="With `policy`: profile the same rows again after training and report how "
                                "each layer's expert load moved (routing/heatmap_diff.png); false skips it.")
    count: Literal["loss", "all"] = Field("loss", description="With `policy`: profile the tokens the loss is on, or all tokens.")
    mode: Literal["lora", "full"] = Field("lora", description="`lora`: low-rank A/B per expert; `full`: train the selected experts' whole weights.")
    r: PositiveInt | None = Field(None, description="Rank of expert LoRA; defaults to `adapter.r`.")
    alpha: float | None = Field(None, gt=0, description="Alpha of expert LoRA; defaults to `adapter.alpha`.")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, v: Any) -> Any:
        if isinstance(v, str) or (isinstance(v, dict) and v and not (set(map(str, v)) & ROUTED_KEYS)):
            return {"experts": v}
        return v

    @field_validator("experts")
    @classmethod
    def _experts(cls, v: Any) -> Any:
        return _parse_selection(v)

    @model_validator(mode="after")
    def _policy_or_experts(self) -> "RoutedExperts":
        if self.policy is not None and self.experts != "none":
            raise ValueError("give either experts or policy, not both")
        if self.max_per_layer is not None and self.max_per_layer < self.min_per_layer:
            raise ValueError(f"max_per_layer ({self.max_per_layer}) must be >= min_per_layer ({self.min_per_layer})")
        return self

    @property
    def enabled(self) -> bool:
        return self.experts != "none" or self.policy is not None


class AdapterSection(Section):
    """Where LoRA goes. Groups: attention (MLA projections), shared_experts, dense_mlp (the dense
    first layers), routed_experts (`none`, `all`, or `{layer: [expert ids]}`)."""

    r: PositiveInt = Field(16, description="Default LoRA rank.")
    alpha: float = Field(32.0, gt=0, description="Default LoRA alpha (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout (not applied on the routed-expert path).")
    attention: LoraGroup = Field(default_factory=LoraGroup, description="LoRA on attention projections.")
    shared_experts: LoraGroup = Field(default_factory=LoraGroup, description="LoRA on the shared experts.")
    dense_mlp: LoraGroup = Field(default_factory=LoraGroup, description="LoRA on the dense MLP of the first layers.")
    routed_experts: RoutedExperts = Field(default_factory=RoutedExperts, description="Routed experts carrying LoRA.")
    router: Literal["frozen", "trainable"] = Field(
        "frozen", description="`trainable` trains the routers' weights (saved in the adapter); correction biases stay frozen."
    )

    def rank_alpha(self, group: str) -> tuple[int, float]:
        """A group's LoRA rank and alpha: its own where set, else the adapter's (training, plan, metadata
        and merge all read them here)."""
        spec = getattr(self, group)
        return spec.r or self.r, spec.alpha or self.alpha

    @model_validator(mode="after")
    def _something_trains(self) -> "AdapterSection":
        if not any(getattr(self, g).enabled for g in ("attention", "shared_experts", "dense_mlp", "routed_experts")):
            raise ValueError("every module group is off; enable at least one of attention, shared_experts, dense_mlp, routed_experts")
        return self


OPTIMIZERS = {"adamw": "adamw_torch", "adamw_8bit": "adamw_bnb_8bit", "paged_adamw_8bit": "paged_adamw_8bit"}


class EarlyStopping(Section):
    """Stop when the held-out loss stops improving (needs data.eval and training.eval_steps)."""

    patience: PositiveInt = Field(description="Evaluations in a row without improvement before training stops.")
    min_delta: float = Field(0.0, ge=0, description="How much lower than the best held-out loss counts as an improvement.")


class TrainingSection(Section):
    """Optimiser, schedule and bookkeeping."""

    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit"] = Field(
        "adamw", description="`adamw` (torch), or bitsandbytes' `adamw_8bit` / `paged_adamw_8bit` (8-bit optimizer "
        "states: less GPU memory on big runs; CUDA only)."
    )
    checkpoints_kept: PositiveInt = Field(2, description="Checkpoints kept in RUN/checkpoints/ (the oldest are deleted).")
    early_stopping: EarlyStopping | None = Field(
        None, description="`{patience: N, min_delta: D}`: stop after N evaluations (every eval_steps) without the "
        "held-out loss falling below its best by more than D; the summary says where and why. The adapter is the "
        "model at the stop."
    )

    lr: float = Field(2e-4, gt=0, description="Peak learning rate.")
    scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = Field("cosine", description="Learning-rate schedule.")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Fraction of steps spent warming up.")
    epochs: float = Field(1.0, gt=0, description="Passes over the training data (ignored when max_steps is set).")
    max_steps: PositiveInt | None = Field(None, description="Stop after this many optimizer steps.")
    micro_batch_size: PositiveInt = Field(1, description="Sequences per device per forward pass.")
    grad_accum: PositiveInt = Field(1, description="Micro-batches per optimizer step.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    seed: NonNegInt = Field(42, description="Seed for weights init, data order and dropout.")
    activation_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    logging_steps: PositiveInt = Field(10, description="Log metrics every N steps.")
    save_steps: PositiveInt = Field(200, description="Checkpoint every N steps.")
    eval_steps: PositiveInt | None = Field(None, description="Evaluate every N steps (needs data.eval); default: at the end only.")
    balance_loss: bool = Field(False, description="Add the model's own load-balance loss (needs adapter.router: trainable).")
    balance_loss_alpha: float | None = Field(
        None, gt=0, description="Weight of the balance loss; defaults to the checkpoint's aux_loss_alpha or router_aux_loss_coef (0.001 if absent)."
    )
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=list, description="Experiment trackers the trainer also logs to (written inside the run "
        "directory; wandb offline unless WANDB_MODE is set)."
    )


DPO_LOSSES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
              "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft")


class ObjectiveSection(Section):
    """A training objective's own section, under the objective's name (`dpo:`, `kto:`, ...). A plug-in
    objective subclasses it and registers it with `register_section` (dsft.train.pipeline.register does)."""

    init_adapter: str | None = Field(
        None, description="An SFT run (or adapter) to continue; for objectives with a reference model it is then "
        "that SFT model."
    )

    @field_validator("init_adapter")
    @classmethod
    def _adapter_exists(cls, v: str | None, info: ValidationInfo) -> str | None:
        v = _expand(v) if v is not None else v
        if v is not None and _checking_files(info):
            path = Path(v)
            if not ((path / "adapter" / "adapter_config.json").is_file() or (path / "adapter_config.json").is_file()
                    or ((path / "recipe.yaml").is_file() and (path / "run.json").is_file())):  # a run not finished:
                # the preflight says how it stands
                raise ValueError(f"{v} is neither a dsft run directory nor an adapter directory; point it at an SFT run")
        return v

    def check(self, recipe: "Recipe", name: str) -> None:
        """Rules between this section and the rest of the recipe: raise ValueError worded as the fix."""

    def inputs(self, name: str) -> dict[str, list[Path]]:
        """The files this section makes the run read (never to be written over)."""
        return {f"initial adapter ({name}.init_adapter)": [Path(self.init_adapter)]} if self.init_adapter else {}


class PromptFit(ObjectiveSection):
    """Prompts fitted to a token budget before training (preference and KTO rows)."""

    max_prompt_length: PositiveInt = Field(512, description="Prompt tokens (rendered with the template) kept per row.")
    prompt_overflow: Literal["truncate", "drop"] = Field(
        "truncate", description="Longer prompts: cut from the left of the last user turn, or drop the row."
    )

    def check(self, recipe: "Recipe", name: str) -> None:
        self.fit_default(recipe.data.max_length)
        if self.max_prompt_length >= recipe.data.max_length:
            raise ValueError(f"{name}.max_prompt_length ({self.max_prompt_length}) must be below data.max_length "
                             f"({recipe.data.max_length}) to leave room for the answers")

    def fit_default(self, max_length: int, room: int | None = None) -> None:
        """max_prompt_length left at its default fits data.max_length: half of it (or what `room` leaves, GRPO's
        completions) when 512 would not fit; never an error about a key the recipe does not set."""
        if "max_prompt_length" in self.model_fields_set:
            return
        limit = max_length - room if room is not None else max_length - 1
        if self.max_prompt_length > limit:
            self.max_prompt_length = max(1, limit if room is not None else max_length // 2)

    def fit(self) -> dict[str, Any]:
        """The settings that change a row's tokens (dsft.data.prepared keys on them)."""
        return {"max_prompt_length": self.max_prompt_length, "prompt_overflow": self.prompt_overflow}


class DpoSection(PromptFit):
    """Direct Preference Optimization (`dsft dpo`) on `data.format: preference` rows."""

    beta: float = Field(0.1, gt=0, description="Strength of the KL penalty towards the reference model.")
    loss_type: Literal[DPO_LOSSES] = Field("sigmoid", description="TRL's DPO loss (sigmoid is the DPO paper's).")
    precompute_ref: bool = Field(False, description="Compute the reference log-probs once before training.")


class OrpoSection(PromptFit):
    """ORPO (`dsft orpo`): the SFT loss on the chosen answer plus an odds-ratio penalty; no reference model."""

    beta: float = Field(0.1, gt=0, description="Weight (the paper's lambda) of the odds-ratio term against the SFT loss.")


class SimpoSection(PromptFit):
    """SimPO (`dsft simpo`): length-normalised log-probabilities with a target margin; no reference model."""

    beta: float = Field(2.0, gt=0, description="Scale of the length-normalised reward (the paper uses 2.0-2.5).")
    gamma: float = Field(1.0, ge=0, description="Target reward margin (the paper keeps gamma / beta near 0.5).")


class KtoSection(PromptFit):
    """KTO (`dsft kto`): desirable / undesirable answers, unpaired (`data.format: kto`, or preference pairs)."""

    beta: float = Field(0.1, gt=0, description="Strength of the KL penalty towards the reference model.")
    desirable_weight: float | None = Field(
        None, gt=0, description="Loss weight of desirable rows; default: set so that desirable_weight x desirable "
        "rows = undesirable_weight x undesirable rows (TRL's advice for uneven labels; the run reports it)."
    )
    undesirable_weight: float | None = Field(None, gt=0, description="Loss weight of undesirable rows; default 1 (see "
                                             "desirable_weight).")
    loss_type: Literal["kto", "apo_zero_unpaired"] = Field(
        "kto", description="`kto` (the paper's, with its KL term: needs training.micro_batch_size above 1) or "
        "`apo_zero_unpaired`."
    )

    def check(self, recipe: "Recipe", name: str) -> None:
        super().check(recipe, name)
        if self.loss_type == "kto" and recipe.training.micro_batch_size < 2:
            raise ValueError(f"training.micro_batch_size {recipe.training.micro_batch_size}: {name}.loss_type kto estimates "
                             "its KL term from the other rows of a micro-batch; set training.micro_batch_size to 2 or "
                             f"more, or {name}.loss_type: apo_zero_unpaired")


REWARD_BUILTINS = ("answer_match", "think_format", "regex", "length")
# The options each built-in reward takes (every reward takes name and weight)
REWARD_OPTIONS = {"answer_match": {"marker"}, "think_format": set(), "regex": {"pattern", "match"},
                  "length": {"target", "unit"}}


class RewardSpec(Section):
    """One reward of `grpo.rewards`: a built-in (`builtin: answer_match | think_format | regex | length`) or the
    user's own function (`function: rewards/legal.py:cites_statute`), with its weight in the sum."""

    builtin: Literal[REWARD_BUILTINS] | None = Field(None, description="A built-in reward (see docs/objectives.md).")
    function: str | None = Field(
        None, description="`FILE.py:NAME`: a function called as TRL calls rewards (prompts, completions, the row's "
        "columns as keywords) returning one float (or None: not applicable) per completion.")
    name: str | None = Field(None, description="The name it is logged under; default: the built-in's or the function's name.")
    weight: float = Field(1.0, description="Its weight in the summed reward.")
    marker: str | None = Field(
        None, description="answer_match: the final answer is the first line after the last MARKER (e.g. `Answer:`), "
        "after any closed reasoning block; default: every \\boxed{...} there (they must agree). No marker or box: no "
        "answer, score 0 (docs/objectives.md).")
    pattern: str | None = Field(None, description="regex: the pattern (Python re syntax).")
    match: Literal["partial", "full"] = Field("partial", description="regex: search anywhere, or match the whole answer.")
    target: PositiveInt | None = Field(None, description="length: the target length.")
    unit: Literal["tokens", "characters"] = Field("tokens", description="length: count tokens or characters.")

    @field_validator("function")
    @classmethod
    def _function(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None:
            return v
        path, sep, name = v.rpartition(":")
        if not sep or not path.strip() or not name.isidentifier():
            raise ValueError(f"give FILE.py:FUNCTION, e.g. rewards/legal.py:cites_statute (got {shown(v)})")
        path = _expand(path)
        if _checking_files(info) and not Path(path).is_file():
            raise ValueError(f"file not found: {path} (paths are relative to the current directory)")
        return f"{path}:{name}"

    @model_validator(mode="after")
    def _one_kind(self) -> "RewardSpec":
        if (self.builtin is None) == (self.function is None):
            raise ValueError("give either builtin (answer_match, think_format, regex, length) or function (FILE.py:NAME)")
        allowed = REWARD_OPTIONS.get(self.builtin or "", set())
        stray = sorted(k for k in ("marker", "pattern", "target") if getattr(self, k) is not None and k not in allowed)
        stray += [k for k, default in (("match", "partial"), ("unit", "tokens")) if getattr(self, k) != default and k not in allowed]
        if stray:
            what = f"the {self.builtin} reward" if self.builtin else "a function reward"
            raise ValueError(f"{', '.join(stray)}: not an option of {what}; remove it")
        if self.builtin == "regex":
            import re

            if not self.pattern:
                raise ValueError("the regex reward needs pattern, e.g. pattern: '§\\s*\\d+'")
            try:
                re.compile(self.pattern)
            except re.error as e:
                raise ValueError(f"pattern {shown(self.pattern)} is not a valid regular expression ({e}); fix it") from None
        if self.builtin == "length" and self.target is None:
            raise ValueError("the length reward needs target (a length in its unit, e.g. target: 200)")
        if self.name is not None and not self.name.strip():
            raise ValueError("name: empty; give the name it is logged under, or leave it out")
        return self

    @property
    def label(self) -> str:
        """The name it is logged under (metrics.jsonl `rewards/LABEL/mean`)."""
        return self.name or self.builtin or (self.function or "").rpartition(":")[2]


GRPO_LOSSES = ("dapo", "grpo", "dr_grpo", "bnpo", "cispo", "sapo")


class GrpoSection(PromptFit):
    """GRPO (`dsft grpo`): completions generated by the model being trained, scored by reward functions, on
    `data.format: prompt` rows."""

    rewards: list[RewardSpec] = Field(default_factory=list, description="The rewards, summed with their weights.")
    num_generations: PositiveInt = Field(8, description="Completions generated per prompt (the group whose rewards "
                                         "are compared); at least 2.")
    max_completion_length: PositiveInt = Field(256, description="Tokens generated per completion at most.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the generation.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling of the generation.")
    beta: float = Field(0.0, ge=0, description="KL penalty towards the reference (0: none, no reference forward; "
                        "TRL's default). The reference is the adapter switched off, or the SFT adapter continued.")
    kl_bias_correction: bool | None = Field(
        None, description="With beta > 0: multiply the per-token KL by the policy ratio, so its gradient is the unbiased "
        "reverse-KL gradient (DeepSeek-V3.2; TRL 1.16's use_bias_correction_kl); default true; false: the plain k3 "
        "estimator of the R1 paper.")
    loss_type: Literal[GRPO_LOSSES] = Field("dapo", description="TRL's GRPO loss (dapo: TRL's default, no length bias; "
                                            "each type's aggregation in docs/objectives.md).")
    epsilon: float | None = Field(None, gt=0, description="Lower clip of the policy ratio, 1 - epsilon (grpo, dr_grpo, "
                                  "bnpo, dapo); default 0.2.")
    epsilon_high: float | None = Field(
        None, gt=0, description="Upper clip: the ratio is clipped at 1 + epsilon_high (grpo, dr_grpo, bnpo, dapo), and "
        "CISPO caps its importance weights at epsilon_high. Default per loss type: dapo 0.28 (DAPO's clip-higher), "
        "cispo 5.0 (ScaleRL's cap; TRL's advice), grpo / dr_grpo / bnpo epsilon (symmetric).")
    sapo_temperature_pos: float | None = Field(None, gt=0, description="sapo: gate temperature for tokens with positive "
                                               "advantage; default 1.0.")
    sapo_temperature_neg: float | None = Field(None, gt=0, description="sapo: gate temperature for tokens with "
                                               "non-positive advantage; default 1.05.")
    reward_timeout: float = Field(
        60.0, gt=0, description="Seconds one call of a user's reward function (`function:`) may take on one batch; longer "
        "stops the run naming the reward. Each function runs in a process of its own.")
    steps_per_generation: PositiveInt | None = Field(
        None, description="Micro-batches one generation feeds (default: training.grad_accum, one optimizer step).")
    num_iterations: PositiveInt = Field(1, description="Optimization passes over each generated batch.")
    log_completions: NonNegInt = Field(4, description="Completions written to RUN/completions.jsonl per logged step.")
    use_vllm: bool = Field(False, description="Not supported yet (see docs/objectives.md).")

    def check(self, recipe: "Recipe", name: str) -> None:
        import math

        problems = []
        if not self.rewards:
            problems.append(f"{name}.rewards: list at least one reward, e.g. - builtin: think_format")
        labels = [r.label for r in self.rewards]
        twice = sorted({x for x in labels if labels.count(x) > 1})
        if twice:
            problems.append(f"{name}.rewards: {', '.join(twice)} named twice; give each its own `name`")
        problems += self._loss_keys(name)
        if self.use_vllm:
            problems.append(f"{name}.use_vllm: not supported yet: TRL's vLLM weight sync merges the adapter into full "
                            "weights every step, which dsft's NF4 expert codes cannot take; remove it (generation runs "
                            "in-process)")
        if self.num_generations < 2:
            problems.append(f"{name}.num_generations {self.num_generations}: GRPO compares the completions of a "
                            "prompt with each other; set it to 2 or more")
        t = recipe.training
        per_generation = t.micro_batch_size * (self.steps_per_generation or t.grad_accum)
        if self.num_generations >= 2 and per_generation % self.num_generations:
            problems.append(f"training.micro_batch_size {t.micro_batch_size}: GRPO counts completions, and one generation "
                            f"({per_generation} = micro_batch_size x {name}.steps_per_generation or grad_accum) must hold "
                            f"whole groups of {name}.num_generations {self.num_generations}; set micro_batch_size to a "
                            f"multiple of {self.num_generations // math.gcd(self.num_generations, per_generation // t.micro_batch_size)}")
        self.fit_default(recipe.data.max_length, self.max_completion_length)
        if self.max_prompt_length + self.max_completion_length > recipe.data.max_length:
            problems.append(f"data.max_length {recipe.data.max_length}: a sequence is {name}.max_prompt_length "
                            f"{self.max_prompt_length} + {name}.max_completion_length {self.max_completion_length} "
                            f"tokens; raise data.max_length to {self.max_prompt_length + self.max_completion_length} "
                            "or lower those")
        if recipe.data.packing:
            problems.append(f"data.packing: {name} trains on generated completions, which are not packed; remove it")
        span = self.generation_span(t.grad_accum)
        if t.save_steps % span:
            nearest = max(span, round(t.save_steps / span) * span)
            problems.append(f"training.save_steps {t.save_steps}: one generation spans {span} optimizer steps "
                            f"({name}.steps_per_generation x num_iterations / training.grad_accum), and a checkpoint "
                            f"must fall between generations to resume exactly; set save_steps to {nearest}")
        if problems:
            raise ValueError("; ".join(problems))

    def _loss_keys(self, name: str) -> list[str]:
        """A key the chosen loss (or beta 0) never reads is refused, never silently ignored."""
        unread = {"cispo": ("epsilon", "sapo_temperature_pos", "sapo_temperature_neg"),
                  "sapo": ("epsilon", "epsilon_high")}.get(self.loss_type, ("sapo_temperature_pos", "sapo_temperature_neg"))
        problems = [f"{name}.{key}: the {self.loss_type} loss does not read it; remove it"
                    + (" (cispo caps its weights at epsilon_high)" if self.loss_type == "cispo" and key == "epsilon" else "")
                    for key in unread if getattr(self, key) is not None]
        if self.kl_bias_correction is not None and self.beta == 0:
            problems.append(f"{name}.kl_bias_correction: only read with a KL term; set {name}.beta above 0 or remove it")
        return problems

    def clip_low(self) -> float:
        return 0.2 if self.epsilon is None else self.epsilon

    def clip_high(self) -> float | None:
        """The epsilon_high TRL gets: the recipe's, else the loss type's default (None where the loss has no clip)."""
        if self.loss_type == "sapo":
            return None
        if self.epsilon_high is not None:
            return self.epsilon_high
        return {"dapo": 0.28, "cispo": 5.0}.get(self.loss_type, self.clip_low())

    def sapo_temperatures(self) -> tuple[float, float]:
        return (1.0 if self.sapo_temperature_pos is None else self.sapo_temperature_pos,
                1.05 if self.sapo_temperature_neg is None else self.sapo_temperature_neg)

    def kl_corrected(self) -> bool:
        return self.kl_bias_correction is not False

    def generation_span(self, grad_accum: int) -> int:
        """Optimizer steps between the starts of two generations' use (checkpoints fall on multiples of it)."""
        import math

        micro = (self.steps_per_generation or grad_accum) * self.num_iterations
        return math.lcm(micro, grad_accum) // grad_accum

    def inputs(self, name: str) -> dict[str, list[Path]]:
        files = [Path(r.function.rpartition(":")[0]) for r in self.rewards if r.function]
        return {**super().inputs(name), **({f"reward function file ({name}.rewards)": files} if files else {})}


# An objective's section under its name, and the data formats objectives add (dsft.train.pipeline.register
# registers a plug-in's). The built-in objectives' sections live here so `dsft validate` needs no torch.
SECTIONS: dict[str, type[ObjectiveSection]] = {"dpo": DpoSection, "kto": KtoSection, "orpo": OrpoSection,
                                               "simpo": SimpoSection, "grpo": GrpoSection}
FORMATS: list[str] = ["messages", "prompt_completion", "alpaca", "sharegpt", "preference", "kto", "prompt"]


def register_section(name: str, model: type[ObjectiveSection]) -> None:
    SECTIONS[name] = model


def register_format(name: str) -> None:
    if name not in FORMATS:
        FORMATS.append(name)


class Recipe(Section):
    """A whole dsft recipe."""

    model: ModelSection
    data: DataSection
    adapter: AdapterSection = Field(default_factory=AdapterSection)
    training: TrainingSection = Field(default_factory=TrainingSection)
    output_dir: str = Field(description="Run directory: adapter, resolved recipe, metrics, checkpoints.")

    @field_validator("output_dir")
    @classmethod
    def _output_dir(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("empty; give the run directory to write, e.g. runs/legal")
        return _expand(v)

    @model_validator(mode="after")
    def _cross(self, info: ValidationInfo) -> "Recipe":
        if self.training.eval_steps is not None and not self.data.eval:
            raise ValueError("training.eval_steps needs data.eval; list eval files or remove eval_steps")
        if self.training.early_stopping is not None and (not self.data.eval or self.training.eval_steps is None):
            raise ValueError("training.early_stopping watches the held-out loss: it needs data.eval and "
                             "training.eval_steps (how often to evaluate); set both or remove early_stopping")
        own = sections(self)
        if len(own) > 1:
            raise ValueError(f"{', '.join(own)}: a recipe is for one objective and no command reads {len(own) - 1} of these "
                             "sections; keep the section of the command you run (one recipe per objective)")
        for name, section in own.items():
            section.check(self, name)
        if self.training.balance_loss and self.adapter.router != "trainable":
            raise ValueError("training.balance_loss needs adapter.router: trainable (a frozen router cannot learn to balance)")
        if _checking_files(info) and not self.model.path.startswith(BUILTIN_PREFIX) and self.data.chat_template is None:
            from dsft.models.files import has_chat_template

            path = Path(self.model.path)
            if path.is_dir() and not has_chat_template(path):
                raise ValueError(f"model.path: {path} has no chat template; set data.chat_template to a Jinja file")
        return self


def sections(recipe: Recipe) -> dict[str, ObjectiveSection]:
    """The objective sections a recipe sets, by name."""
    return {name: section for name in SECTIONS if isinstance(section := getattr(recipe, name, None), ObjectiveSection)}


def foreign_section(recipe: Recipe, command: str) -> str | None:
    """The one line refusing `dsft COMMAND` on a recipe whose objective section is another command's (it would
    be silently ignored); None when the recipe fits the command."""
    for name, section in sections(recipe).items():
        if name == command:
            continue
        given = ", ".join(sorted(section.model_fields_set)) or "nothing but defaults"
        fix = f"rename the section to `{command}:` and check its keys" if command in SECTIONS else "remove the section"
        return (f"{name}: this section is for `dsft {name}`; `dsft {command}` does not read it (it sets {given}): run "
                f"`dsft {name}`, or {fix}")
    return None


_MODELS: dict[tuple, type[Recipe]] = {}


def recipe_model() -> type[Recipe]:
    """The Recipe class with a field per registered objective section (built again when one registers);
    unknown keys stay refused with their dotted path, as everywhere."""
    from pydantic import create_model

    key = tuple((name, id(model)) for name, model in SECTIONS.items())
    if key not in _MODELS:
        fields = {name: (model | None, Field(None, description=f"`dsft {name}` settings: {(model.__doc__ or name).strip().splitlines()[0]}"))
                  for name, model in SECTIONS.items()}
        _MODELS[key] = create_model("Recipe", __base__=Recipe, **fields)
    return _MODELS[key]
