"""What an objective is (`Objective`, a plug-in: its section, formats, panels, data checks and tokens, TRL
config and trainer, card lines, result table), the table of registered ones (`OBJECTIVES`: `register`,
`unregister`, `objective(name)`, which imports a built-in's module from dsft.train.BUILTIN on first use), and
what the spine hands an objective (`Prepared`) and some give back (`StepsResult`)."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dsft.config.base import ObjectiveSection
from dsft.config.schema import Recipe
from dsft.errors import DsftError
from dsft.runs import run_dir
from dsft.train import BUILTIN

if TYPE_CHECKING:
    import torch

OBJECTIVES: dict[str, "Objective"] = {}


@dataclass
class StepsResult:
    """What an objective that reports its first and last logged steps returns (preference objectives, GRPO)."""

    run: Path
    groups: dict[str, int]  # trainable parameters per adapter group
    rows: int
    first: dict[str, float]
    last: dict[str, float]
    counts: dict[str, int]  # rows, truncated, dropped, ...


@dataclass
class Prepared:
    """Everything checked and built before the run directory exists."""

    recipe: Recipe
    model_path: Path
    config: dict[str, Any]
    selection: dict[int, list[int] | None] | None  # None: a policy decides after profiling
    tokenizer: Any
    train: Any  # the training rows' tokens (dsft.data.prepared.Tokens: what trains, and the profiled sample)
    eval: Any | None
    truncation: dict[str, int] | None = None  # what data.max_length cuts (None when packing)
    init_adapter: Path | None = None  # an adapter the run continues (DPO's dpo.init_adapter)
    data: dict[str, Any] = field(default_factory=dict)  # the objective's own prepared data


LOSS_PANELS = {"loss": (("train", "loss"), ("eval", "eval_loss")), "learning rate": (("lr", "learning_rate"),)}


class Objective:
    """What an objective is to the spine: a plug-in. Subclass, set what it declares, override what it does,
    `register` it. Nothing else in dsft names an objective.

    Declares: `name` (its command, and its recipe section's key), `section` (that section's pydantic model,
    a dsft.config.base.ObjectiveSection), `formats` (the data.format values it trains on; a new one is
    registered), `panels` (curves.png: panel title -> (line label, metrics.jsonl key) pairs), `shown` (its
    console keys). Does: its
    data checks and tokens, its TRL config class and the fields it sets there, its trainer, what it adds to
    the adapter's metadata, the model card and run.json's summary. The spine records for every run what
    every run has (dsft.train.summary.spine_summary)."""

    name = ""
    section: type[ObjectiveSection] | None = None
    formats: tuple[str, ...] = ()
    panels: dict[str, tuple[tuple[str, str], ...]] = LOSS_PANELS

    shown: dict[str, str] = {}  # its metrics on the console's line per logged step: metrics.jsonl key -> label

    mixes = False  # takes data.train's {path, weight | rows} shares (dsft.data.prepared.prepare_mix)
    loss_unit = "loss (nats per token)"  # the y axis of curves.png's loss panel: what the objective's loss is

    def settings(self, recipe: Recipe) -> Any:
        """The recipe's section of this objective, or its defaults when the recipe leaves it out."""
        if self.section is None:
            return None
        return getattr(recipe, self.name, None) or self.section()

    def load_rows(self, recipe: Recipe) -> Any:
        """Check what can be checked of the data before any model file is read (the rows themselves are
        checked as they are tokenized, dsft.data.prepared)."""
        if self.formats and recipe.data.format not in self.formats:
            raise DsftError(f"data.format: `dsft {self.name}` trains on {' or '.join(self.formats)} rows; set data.format "
                            f"to {self.formats[0]} (got {recipe.data.format})")
        for i, fmt in enumerate(recipe.data.file_formats()):
            if self.formats and fmt not in self.formats:
                raise DsftError(f"data.train[{i}].format: `dsft {self.name}` trains on {' or '.join(self.formats)} rows "
                                f"(got {fmt})")
        if recipe.data.shares() and not self.mixes:
            raise DsftError(f"data.train: `dsft {self.name}` takes its files whole; leave weight and rows out of its "
                            "entries (they mix sft data; format and columns work for every objective)")

    def init_adapter(self, recipe: Recipe, config: dict[str, Any]) -> Path | None:
        """An adapter to continue rather than a fresh one (the section's init_adapter), checked against the
        base: the one it was trained on, its tensors and metadata."""
        settings = self.settings(recipe)
        if settings is None or not getattr(settings, "init_adapter", None):
            return None
        return check_init_adapter(recipe, f"{self.name}.init_adapter", Path(settings.init_adapter), config)

    def tokenize(self, recipe: Recipe, tokenizer: Any, rows: Any) -> dict[str, Any]:
        """Prepared's `train`, `eval`, `truncation` and `data` fields."""
        raise NotImplementedError

    def config_class(self) -> type:
        """Its TRL config class; the spine passes it only the arguments it has (trl_config)."""
        raise NotImplementedError

    def config_args(self, recipe: Recipe, prepared: Prepared) -> dict[str, Any]:
        """Its own fields of that config (beta, loss_type, ...)."""
        return {}

    def trainer(self, model: torch.nn.Module, args: Any, prepared: Prepared, callbacks: list[Any]) -> Any:
        raise NotImplementedError

    def before_train(self, trainer: Any, prepared: Prepared) -> None:
        """Work on the model once it is laid out over the processes (training.parallel) and before it trains (GRPO:
        its rewards checked on a generated group); the model cannot run before that when each rank holds only its
        experts."""

    def after_train(self, trainer: Any, prepared: Prepared, run: Path) -> dict[str, Any]:
        """Work on the trained model before it is saved (SFT: held-out loss, routing change)."""
        return {}

    def adapter_metadata(self, prepared: Prepared) -> dict[str, Any]:
        """Extra keys for the adapter's dsft_adapter.json: by default its section's settings."""
        settings = self.settings(prepared.recipe)
        if settings is None:
            return {}
        return {self.name: {**settings.model_dump(mode="json"),
                            "init_adapter": str(prepared.init_adapter) if prepared.init_adapter else None}}

    def curve_panels(self, recipe: Recipe) -> dict[str, tuple[tuple[str, str], ...]]:
        """curves.png's panels for this recipe (by default `panels`; GRPO adds a line per reward)."""
        return self.panels

    def log_parts(self, logs: dict[str, Any]) -> list[str]:
        """What the console shows of a logged row beyond `shown`, right after the loss (GRPO: each reward)."""
        return []

    def metric_lines(self, summary: dict[str, Any]) -> list[str]:
        """Its lines under the model card's final metrics (pair objectives: reward accuracy and margin)."""
        return []

    def card_lines(self, recipe: Recipe, summary: dict[str, Any]) -> list[str]:
        """Its lines in the model card's recipe highlights: its section's settings."""
        settings = self.settings(recipe)
        if settings is None:
            return []
        values = ", ".join(f"{k} {v}" for k, v in settings.model_dump().items() if k != "init_adapter" and v is not None)
        return [f"- {self.name}: {values}" + (f", continues `{settings.init_adapter}`" if settings.init_adapter else "")]

    def finish(self, run: Path, prepared: Prepared, trainer: Any, metrics: Any, groups: dict[str, int],
               targets: dict[str, list[str]], plan: dict[str, Any] | None, extra: dict[str, Any]) -> tuple[Any, dict]:
        """(the result the command prints, its fields of run.json's summary)."""
        raise NotImplementedError

    columns: tuple[str, ...] = ("what", "value")  # the command's result table

    def table(self, result: Any) -> list[tuple[str, ...]]:
        """The rows of the command's result table under `columns` (the result `finish` returned)."""
        return []


def register(objective: Objective) -> Objective:
    """Add an objective to OBJECTIVES (the CLI's table), its section to the recipe and its formats to
    data.format's values."""
    from dsft.config.registry import register_format, register_section

    if objective.section is not None:
        register_section(objective.name, objective.section)
    for fmt in objective.formats:
        register_format(fmt)
    OBJECTIVES[objective.name] = objective
    return objective


def unregister(name: str) -> None:
    """Remove a registered objective: its table row, its section and the formats only it trains on (their
    converters too). A built-in one comes back when next named."""
    from dsft.config.registry import unregister as unregister_recipe
    from dsft.data.formats import unregister_converter

    goal = OBJECTIVES.pop(name, None)
    if goal is None:
        return
    others = {fmt for other in OBJECTIVES.values() for fmt in other.formats}
    own = tuple(fmt for fmt in goal.formats if fmt not in others)
    unregister_recipe(name if goal.section is not None else None, own)
    for fmt in own:
        unregister_converter(fmt)


def objective(name: str) -> Objective:
    if name not in OBJECTIVES and name in BUILTIN:
        importlib.import_module(BUILTIN[name].module)  # a built-in objective: its module registers it
    if name not in OBJECTIVES:
        raise DsftError(f"unknown objective {name!r}; known: {', '.join(sorted({*OBJECTIVES, *BUILTIN}))}")
    return OBJECTIVES[name]


def objective_for(recipe: Recipe) -> Objective:
    """The objective a recipe is written for, where no command names it (`dsft experts`, `dsft validate`):
    the one whose section it sets, else the first that trains on its data.format (sft for conversations)."""
    from dsft.config.schema import sections

    named = list(sections(recipe))
    if named:
        return objective(named[0])
    for name in ("sft", *BUILTIN, *OBJECTIVES):
        goal = objective(name)
        if recipe.data.format in goal.formats:
            return goal
    return objective("sft")


def check_init_adapter(recipe: Recipe, key: str, path: Path, config: dict[str, Any]) -> Path:
    """An adapter a run continues: not a training checkpoint, trained on this base (architecture and
    weights), its tensors and metadata checked against it. Returns its adapter directory."""
    from dsft.adapters.metadata import read_metadata
    from dsft.adapters.weights import check_adapter_dir
    from dsft.models.identity import check_base
    from dsft.models.load import resolve_model_path

    run_dir.refuse_checkpoint(path, key)
    _, adapter, _ = run_dir.adapter_source(path, key, "continue")
    check_base(read_metadata(adapter).get("base_model"), resolve_model_path(recipe.model.path, recipe.model.revision), key,
               force_hint=None)
    check_adapter_dir(adapter, key, config)
    return adapter
