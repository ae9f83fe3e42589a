"""The built-in objectives' recipe sections (`dpo:`, `kto:`, `orpo:`, `simpo:`, `grpo:` with its rewards),
registered into the recipe (dsft.config.registry.SECTIONS) when this module is imported (dsft.config does).
No torch: `dsft validate` checks them."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from dsft.config.base import NonNegInt, ObjectiveSection, PositiveInt, Section, checking_files, expand_path
from dsft.config.registry import register_format, register_section
from dsft.errors import shown

if TYPE_CHECKING:
    from dsft.config.schema import Recipe

DPO_LOSSES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
              "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft")


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

    implicit_reward_beta: ClassVar[bool] = True
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

    implicit_reward_beta: ClassVar[bool] = True
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
        path = expand_path(path)
        if checking_files(info) and not Path(path).is_file():
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


for _name, _section in {"dpo": DpoSection, "kto": KtoSection, "orpo": OrpoSection, "simpo": SimpoSection,
                        "grpo": GrpoSection}.items():
    register_section(_name, _section)
for _format in ("preference", "kto", "prompt"):
    register_format(_format)
