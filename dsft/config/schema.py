"""The recipe schema: one pydantic model per section, unknown keys refused everywhere.

Field validators that touch the filesystem run only when validation is given
``context={"check_files": True}``, so ``dsft validate`` stays static by default and every error,
static or file-related, is still reported in one pass.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from dsft.config.base import NonNegInt, ObjectiveSection, PositiveInt, Section, checking_files, expand_path
from dsft.config.data import DataSection
from dsft.config.registry import SECTIONS
from dsft.errors import shown
from dsft.models.builtin import CONFIGS
from dsft.models.builtin import PREFIX as BUILTIN_PREFIX

BUILTIN_MODELS = tuple(CONFIGS)


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

    @field_validator("path")
    @classmethod
    def _path(cls, v: str, info: ValidationInfo) -> str:
        if not v.strip():
            raise ValueError("empty; give a checkpoint directory or builtin:tiny-deepseek-v3")
        v = expand_path(v)
        if v.startswith(BUILTIN_PREFIX):
            name = v[len(BUILTIN_PREFIX):]
            if name not in BUILTIN_MODELS:
                raise ValueError(f"unknown built-in model {name!r}; use one of: " + ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_MODELS))
            return v
        from dsft.hub import is_repo_id

        if checking_files(info) and not is_repo_id(v):  # a hub id is resolved (and its files checked) in the preflight
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


class LoraGroup(Section):
    """LoRA on one group of modules. `true`/`false` is shorthand for `{enabled: true/false}`."""

    enabled: bool = True
    r: PositiveInt | None = Field(None, description="Rank for this group; defaults to `adapter.r`.")
    alpha: float | None = Field(None, gt=0, description="Scale numerator for this group; defaults to `adapter.alpha`.")

    @model_validator(mode="before")
    @classmethod
    def _from_bool(cls, v: Any) -> Any:
        return {"enabled": v} if isinstance(v, bool) else v


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


class ParallelSection(Section):
    """How several processes share the model (`--num-processes N` or `accelerate launch`): FSDP2 over all N, and
    expert parallelism over `ep` of them (transformers.distributed; docs/multi-gpu.md)."""

    ep: PositiveInt = Field(description="Ranks that split each layer's routed experts between them (each holds 1/ep of "
                            "them, NF4 codes, scales and expert LoRA alike; tokens travel to their experts by all-to-all). "
                            "Divides the number of processes and the model's routed experts.")


class TrainingSection(Section):
    """Optimiser, schedule and bookkeeping."""

    parallel: ParallelSection | None = Field(
        None, description="`{ep: M}`: FSDP2 over every process and expert parallelism over M of them, instead of one "
        "whole model per process (DDP). Every objective; expert LoRA on all routed experts or a subset (padded slots); "
        "not routed_experts.mode: full (docs/multi-gpu.md)."
    )

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
        return expand_path(v)

    @model_validator(mode="after")
    def _cross(self, info: ValidationInfo) -> "Recipe":
        parallel, routed = self.training.parallel, self.adapter.routed_experts
        if parallel is not None and parallel.ep > 1 and routed.mode == "full":
            raise ValueError("training.parallel.ep: experts trained whole (adapter.routed_experts.mode: full) are not "
                             "split by expert parallelism yet; use mode: lora, or remove training.parallel")
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
        if checking_files(info) and not self.model.path.startswith(BUILTIN_PREFIX) and self.data.chat_template is None:
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
