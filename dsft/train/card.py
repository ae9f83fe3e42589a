"""The run's README.md: a dsft model card (base and its identity, data with sha256, recipe highlights,
final metrics, adapted experts, the next commands). The same card goes into adapter/ so a copied
adapter keeps it; PEFT's and TRL's boilerplate cards are not written (dsft.train.trainer)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dsft.outputs import write_atomic
from dsft.runs import run_dir


# the run-dir entries the card lists (names from run_dir, the layout's owner), when the run holds them
FILES = {f"{run_dir.ADAPTER}/": "the adapter in dsft's layout, tokenizer, dsft_adapter.json (`dsft export --format peft` for stock PEFT)", run_dir.RECIPE: "the resolved recipe",
         run_dir.RUN_JSON: "versions, data sha256, summary", run_dir.METRICS: "every logged step",
         run_dir.CURVES: "loss, lr (and rewards)", run_dir.LOG: "the full log", run_dir.PLAN: "the targeting plan",
         f"{run_dir.ROUTING}/": "routing profile and heatmaps", f"{run_dir.CHECKPOINTS}/": "for --resume"}


def number(value: Any) -> str:
    return "-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def _groups(meta: dict[str, Any]) -> list[str]:
    """Each group the adapter holds, with its rank and alpha, from its dsft_adapter.json (what was trained,
    also when the run continued another adapter)."""
    out = [f"{group} r={g['r']} alpha={g['alpha']:g}" for group, g in (meta.get("groups") or {}).items() if "r" in g]
    routed = meta.get("routed_experts") or {}
    if routed.get("experts"):
        kind = "full weights" if routed.get("mode") == "full" else f"r={routed['r']} alpha={routed['alpha']:g}"
        out.append(f"routed_experts {kind}")
    return out or ["no LoRA group"]


def metrics_lines(summary: dict[str, Any], objective_lines: list[str] = ()) -> list[str]:
    """The final metrics, each with the data it was measured on (the objective's own after the training loss)."""
    first, last = summary.get("first") or {}, summary.get("last") or {}  # DPO: the first and last logged rows
    lines = [f"- training loss, first -> last logged step: {number(summary.get('first_loss', first.get('loss')))} -> "
             f"{number(summary.get('last_loss', last.get('loss')))} (training data)", *objective_lines]
    if summary.get("eval_loss") is not None:
        base = summary.get("base_eval_loss")
        lines.append(f"- held-out loss (data.eval): {number(summary['eval_loss'])}"
                     + (f", base model {number(base)}" if base is not None else ""))
    stop = summary.get("early_stopping") or {}
    if stop.get("stopped_at_step"):
        lines.append(f"- early stopping at step {stop['stopped_at_step']} of {stop['of_steps']}: held-out loss best "
                     f"{number(stop['best_eval_loss'])} at step {stop['best_step']}, no improvement above "
                     f"{stop['min_delta']:g} for {stop['evaluations_without_improvement']} evaluations (patience "
                     f"{stop['patience']}); the adapter is the model at the stop")
    if summary.get("routing_change"):
        moved = ", ".join(f"L{layer} {share:.1%}" for layer, share in summary["routing_change"].items())
        lines.append(f"- routing change (expert load moved by the adapter, on the profiled sample of "
                     f"{summary.get('routing_sample_rows')} training rows): {moved}")
    return lines


def build_card(run: Path, kind: str, recipe: Any, info: dict[str, Any], summary: dict[str, Any],
               plan: dict[str, Any] | None, meta: dict[str, Any], objective_lines: list[str] = (),
               metric_lines: list[str] = ()) -> str:
    base = info.get("base_model", {})
    r = recipe
    lines = [run_dir.CARD_MARK, f"# {Path(run).name}: dsft {kind} adapter", "",
             f"A LoRA adapter trained by dsft {info.get('versions', {}).get('dsft', '')} with `dsft {kind}` "
             f"({info.get('time', '')}).", "", "## Base model", "",
             f"- path: `{base.get('path')}`" + (f" (resolved: `{base['resolved_path']}`)"
                                                if base.get("resolved_path") and base.get("resolved_path") != base.get("path") else ""),
             f"- architecture: {', '.join(base.get('architectures') or [])} (`model_type: {base.get('model_type')}`), "
             f"{base.get('num_hidden_layers')} layers, hidden size {base.get('hidden_size')}",
             *([f"- Hugging Face Hub commit: `{base['hub_commit']}`"] if base.get("hub_commit") else []),
             f"- config.json sha256: `{base.get('config_sha256')}`",
             f"- weights fingerprint: `{base.get('weights_fingerprint')}` (merge, export, eval and chat check it)",
             "", "## Data", ""]
    mix = {m["path"]: m for m in summary.get("data_mix") or []}
    for path, sha in info.get("data_sha256", {}).items():
        m = mix.get(path)
        share = (f": {m['rows_used']:,} of its {m['rows_in_file']:,} rows, {m['share']:.0%} of the mix"
                 + (f" (weight {m['weight']:g})" if "weight" in m else f" (rows {m['rows']:,})" if "rows" in m else "")
                 + (f", format `{m['format']}`" if m.get("format") and m["format"] != r.data.format else "")) if m else ""
        hub = (r.data.sources or {}).get(path) or (info.get("data_sources") or {}).get(path)
        origin = (f" (Hub dataset `{hub['hub']}`" + (f" subset `{hub['name']}`" if hub.get("name") else "")
                  + f", split `{hub['split']}`, commit `{hub.get('commit')}`)") if hub else ""
        lines.append(f"- `{path}`{origin} sha256 `{sha}`{share}")
    lines += [f"- format `{r.data.format}`, max_length {r.data.max_length}, packing {r.data.packing}", "",
              "## Recipe highlights (full: recipe.yaml)", "",
              "- adapter: " + "; ".join(_groups(meta)) + f"; router {r.adapter.router}",
              f"- training: lr {r.training.lr} ({r.training.scheduler}), epochs {r.training.epochs}"
              + (f", max_steps {r.training.max_steps}" if r.training.max_steps else "")
              + f", micro-batch {r.training.micro_batch_size} x grad_accum {r.training.grad_accum}, seed {r.training.seed}"]
    lines += objective_lines
    lines += ["", "## Final metrics", "", *metrics_lines(summary, list(metric_lines)), ""]
    experts = (meta.get("routed_experts") or {}).get("experts")
    lines += ["## Adapted experts", ""]
    if experts:
        how = (f"chosen by policy `{r.adapter.routed_experts.policy}`" if r.adapter.routed_experts.policy else
               "listed in the recipe") if plan is not None else "as in the adapter this run continued"
        selected = sum(len(e) for e in experts.values() if e is not None)
        lines += [f"{selected} routed experts carry the adapter, {how}:", ""]
        lines += [f"- layer {layer}: experts {', '.join(map(str, e)) if e is not None else 'all'}"
                  for layer, e in sorted(experts.items(), key=lambda kv: int(kv[0]))]
    else:
        lines.append("No routed experts adapted.")
    trainable = summary.get("trainable_params") or {}
    if trainable:
        lines += ["", "Trainable parameters: " + ", ".join(f"{g} {n:,}" for g, n in trainable.items() if n)]
    lines += ["", "## Next", "", "```", *next_commands(run, r, meta), "```", ""]
    if not _peft_inexpressible(meta):
        peft_out = _unused(Path(run).parent / f"{Path(run).name}-peft")
        lines += ["Load the adapter in your own code with stock transformers and PEFT (after the `--format peft` "
                  "export above; `adapter/` itself is dsft's layout, which dsft's commands read):", "", "```python",
                  "from peft import PeftModel", "from transformers import AutoModelForCausalLM", "",
                  f"base = AutoModelForCausalLM.from_pretrained(\"{base_path(info)}\", dtype=\"auto\")",
                  f"model = PeftModel.from_pretrained(base, \"{peft_out}\")", "```", ""]
    lines += ["Files: " + ", ".join(f"{name} ({what})" for name, what in FILES.items()
                                    if (Path(run) / name.rstrip("/")).exists()) + ".", ""]
    return "\n".join(lines)


def _unused(path: Path) -> Path:
    """`path`, or `path-2`, `path-3`, ... : the first that does not exist yet (the card's commands must run)."""
    candidate, n = path, 1
    while candidate.exists() or candidate.is_symlink():
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate


def _peft_inexpressible(meta: dict[str, Any]) -> bool:
    """A router trained whole or whole experts: no LoRA format holds them (dsft.export.peft / vllm refuse)."""
    return bool(meta.get("router") == "trainable" or (meta.get("routed_experts") or {}).get("mode") == "full")


def base_path(info: dict[str, Any]) -> str:
    base = info.get("base_model", {})
    return str(base.get("resolved_path") or base.get("path"))


def next_commands(run: Path, recipe: Any, meta: dict[str, Any]) -> list[str]:
    """The card's next commands, each runnable as written: eval with what the run's data needs, outputs
    that do not exist yet, exports only where a LoRA format can hold the adapter."""
    from dsft.data.formats import UNSCORED

    d = recipe.data
    lines = []
    if d.format in UNSCORED:
        lines.append(f"# dsft eval --adapter {run} --data FILE   (conversations or pairs: the run's own rows are "
                     f"{UNSCORED[d.format]})")
    elif d.eval:
        lines.append(f"dsft eval   --adapter {run}   # held-out data.eval: base vs adapter")
    else:
        lines.append(f"dsft eval   --adapter {run} --on-train   # no data.eval: scores the training rows")
    lines.append(f"dsft chat   --adapter {run}")
    parent, name = Path(run).parent, Path(run).name
    lines.append(f"dsft merge  --adapter {run} --out {_unused(parent / f'{name}-merged')} --verify")
    if _peft_inexpressible(meta):
        lines.append("# dsft export: the run trains a router or whole experts, which no LoRA format holds; merge it")
    else:
        lines.append(f"dsft export --adapter {run} --format peft --out {_unused(parent / f'{name}-peft')}")
        lines.append(f"dsft export --adapter {run} --format vllm --out {_unused(parent / f'{name}-vllm')}")
    return lines


def write_card(run: Path, kind: str, recipe: Any, info: dict[str, Any], summary: dict[str, Any],
               plan: dict[str, Any] | None, objective_lines: list[str] = (), metric_lines: list[str] = ()) -> Path:
    """RUN/README.md and RUN/adapter/README.md (each written beside itself, then renamed)."""
    from dsft.adapters.metadata import read_metadata

    text = build_card(run, kind, recipe, info, summary, plan, read_metadata(run_dir.adapter_dir(run)), list(objective_lines),
                      list(metric_lines))
    for target in (run_dir.card(run), run_dir.adapter_dir(run) / run_dir.CARD):
        if target.parent.is_dir():
            write_atomic(target, text)
    return run_dir.card(run)
