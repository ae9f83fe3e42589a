"""What every recipe section is built on: pydantic models that refuse unknown keys, strict counts, paths
expanded as a shell would, file checks only when asked (`context={"check_files": True}`), and the base of
an objective's own section. No torch."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationInfo, field_validator

# Strict: YAML's `true` or `.inf` is no count of anything (pydantic would take `true` as 1).
PositiveInt = Annotated[int, Strict(), Field(gt=0)]
NonNegInt = Annotated[int, Strict(), Field(ge=0)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)


def checking_files(info: ValidationInfo) -> bool:
    return bool(info.context and info.context.get("check_files"))


def expand_path(path: str) -> str:
    """`~` and `~user` expanded, as a shell would (a recipe is not run through one)."""
    return os.path.expanduser(path) if path.startswith("~") else path


class ObjectiveSection(Section):
    """A training objective's own section, under the objective's name (`dpo:`, `kto:`, ...). A plug-in
    objective subclasses it and registers it with `register_section` (dsft.train.objective.register does)."""

    # the objective scores against a frozen reference with this section's `beta` (its implicit reward, which
    # `dsft eval` recomputes on pairs); False where beta means something else (ORPO's lambda, SimPO's scale)
    implicit_reward_beta: ClassVar[bool] = False

    init_adapter: str | None = Field(
        None, description="An SFT run (or adapter) to continue; for objectives with a reference model it is then "
        "that SFT model."
    )

    @field_validator("init_adapter")
    @classmethod
    def _adapter_exists(cls, v: str | None, info: ValidationInfo) -> str | None:
        v = expand_path(v) if v is not None else v
        if v is not None and checking_files(info):
            path = Path(v)
            if not ((path / "adapter" / "adapter_config.json").is_file() or (path / "adapter_config.json").is_file()
                    or ((path / "recipe.yaml").is_file() and (path / "run.json").is_file())):  # a run not finished:
                # the preflight says how it stands
                raise ValueError(f"{v} is neither a dsft run directory nor an adapter directory; point it at an SFT run")
        return v

    def check(self, recipe: Any, name: str) -> None:  # recipe: the whole dsft.config.schema.Recipe
        """Rules between this section and the rest of the recipe: raise ValueError worded as the fix."""

    def inputs(self, name: str) -> dict[str, list[Path]]:
        """The files this section makes the run read (never to be written over)."""
        return {f"initial adapter ({name}.init_adapter)": [Path(self.init_adapter)]} if self.init_adapter else {}
