"""`dsft eval`: judge a run before deploying it.

Held-out loss and perplexity of the base and of base + adapter on the same assistant tokens, a few
greedy answers to held-out prompts, and the routing drift (how much of each layer's expert load the
adapter moved). Reads the run's recipe; writes RUN/eval.json.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any

import torch

from dsft.config.schema import Recipe
from dsft.data.formats import UNSCORED, Messages
from dsft.data.prepared import Spec, prepare
from dsft.data.tokenize import IGNORE
from dsft.errors import DsftError
from dsft.outputs import write_atomic


def open_run(run: Path, force: bool = False, command: str = "evaluate") -> tuple[Recipe, Path, Path]:
    """(recipe, adapter directory, base model path) of a finished run, or of one of a run's checkpoints
    (`RUN/checkpoints/checkpoint-N`: its adapter as saved there, whatever the run's status), every file
    checked before a model is loaded: not while it trains, a failed or interrupted run only with --force, the
    adapter's files, and the base it names is still the model the adapter was trained on."""
    from dsft.adapters.metadata import read_metadata
    from dsft.adapters.weights import check_adapter_dir
    from dsft.models.check import check_checkpoint
    from dsft.models.files import model_dir_error, read_model_config
    from dsft.models.identity import check_base
    from dsft.models.load import resolve_model_path
    from dsft.config.load import load_run_recipe
    from dsft.runs.run_dir import adapter_source, check_usable, recipe_file

    if not Path(run).is_dir():
        raise DsftError(f"--adapter {run}: no such run directory; give the output_dir of a dsft run (or one of its "
                        "checkpoints)")
    owner, adapter_dir, checkpoint = adapter_source(Path(run), "--adapter", command)
    if owner is None:
        raise DsftError(f"--adapter {run}: an adapter directory outside a dsft run; give the run directory (its recipe "
                        "names the base and the data)")
    recipe = load_run_recipe(owner)
    if checkpoint is None:  # a checkpoint was chosen as it is: the run's status does not stop it
        check_usable(owner, force, command)
    model_path = resolve_model_path(recipe.model.path, recipe.model.revision)
    key = f"{recipe_file(owner)}: model.path"
    model_dir_error(model_path, key, tokenizer=False)
    recorded = read_metadata(adapter_dir).get("base_model")
    check_base(recorded, model_path, key, weights=False)
    check_checkpoint(model_path, key)
    check_base(recorded, model_path, key, force, f"pass --force to {command} the adapter on this checkpoint anyway")
    check_adapter_dir(adapter_dir, base_config=read_model_config(model_path))
    return recipe, adapter_dir, model_path


def file_kind(files: list[str]) -> tuple[str, str | None]:
    """(kind, the conversations' format) of the rows in `files`: every row a preference pair, or every
    row a conversation; a mix is an error naming the first row of the other kind."""
    from dsft.data.formats import iter_rows, row_format

    kind, first, fmt = None, None, None
    for name in files:
        for where, row in iter_rows(Path(name)):
            fmt_here = row_format(row)
            this = "pairs" if fmt_here == "preference" else "conversations"
            if kind is None:
                kind, first, fmt = this, where, None if this == "pairs" else fmt_here
            elif this != kind:
                what = "a preference pair (chosen, rejected)" if this == "pairs" else "a conversation (no chosen / rejected)"
                raise DsftError(f"{where}: {what} in a file of {kind} (first row {first}); score pairs and "
                                "conversations from separate files")
    if kind is None:
        raise DsftError(f"{files[0]}: no rows to score; pass --data with held-out rows")
    return kind, fmt




def eval_rows(recipe: Recipe, data: str | list[str] | None, on_train: bool = False) -> tuple[str, str, list[str]]:
    """(kind, the rows' format, files): preference pairs or conversations from --data (one file, or the
    files another run's eval read, for --against), else data.eval, else (with --on-train) data.train."""
    d = recipe.data
    given = [data] if isinstance(data, str) else list(data or [])
    for path in given:
        if not Path(path).is_file():
            raise DsftError(f"--data {path}: file not found")
        trained = None if on_train else training_file(recipe, Path(path))
        if trained:
            raise DsftError(f"--data {path}: the run trained on this file ({trained}, same sha256), so its loss is not a "
                            "held-out measure; pass rows it did not train on, or add --on-train to score it labelled as "
                            "training data")
    if not given and not d.eval and not on_train:
        raise DsftError("--data: the run has no held-out data (its recipe sets no data.eval); pass --data FILE with "
                        "rows it did not train on, or --on-train to score its training data (not a held-out measure)")
    if not given and d.format in UNSCORED:
        raise DsftError(f"--data: the run's rows ({'data.eval' if d.eval else 'data.train'}) are {UNSCORED[d.format]} "
                        f"(data.format: {d.format}), which have no loss to score; pass --data FILE with conversations or "
                        "preference pairs it did not train on")
    files = given or (d.train if on_train or not d.eval else d.eval)  # --on-train: the training rows, as it says
    kind, fmt = file_kind(files)
    if kind == "pairs":
        return kind, "preference", files
    return kind, fmt if given else (d.format if d.format != "preference" else fmt), files


def first_conversations(files: list[str], kind: str, fmt: str, system_prompt: str | None, count: int) -> list[Messages]:
    """The first `count` rows as conversations (a pair as its prompt and chosen answer, a judged completion
    with its prompt, a prompt alone), read streaming."""
    from dsft.data.formats import iter_rows, to_messages
    from dsft.data.preference import to_pair, to_unpaired
    from dsft.data.prompts import to_prompt

    out: list[Messages] = []
    for name in files:
        for _, row in iter_rows(Path(name)):
            if len(out) >= count:
                return out
            if kind == "pairs" or fmt == "preference":
                pair = to_pair(row, system_prompt)
                out.append(pair["prompt"] + pair["chosen"])
            elif fmt == "kto":
                judged = to_unpaired(row, system_prompt)[0]
                out.append(judged["prompt"] + judged["completion"])
            elif fmt == "prompt":
                out.append(to_prompt(row, system_prompt)["prompt"])
            else:
                out.append(to_messages(row, fmt, system_prompt))
    return out


def training_file(recipe: Recipe, path: Path) -> str | None:
    """The run's training file that `path` is (the same file, or the same bytes), or None."""
    from dsft.data.keys import file_sha256

    sha = file_sha256(path)
    for name in recipe.data.train:
        train = Path(name)
        if train.is_file() and (train.resolve() == path.resolve() or file_sha256(train) == sha):
            return name
    return None


@torch.no_grad()
def example_losses(model: torch.nn.Module, tokens: dict[str, list[list[int]]], batch_size: int,
                   pad_id: int) -> list[tuple[float, int]]:
    """Per example: (summed cross-entropy of its assistant tokens, how many there are)."""
    from dsft.moe.fused import autocast_for
    from dsft.moe.profile import batches

    device = next(model.parameters()).device
    out = []
    for ids, attention, labels in batches(tokens, batch_size, pad_id):
        with autocast_for(model):
            logits = model(input_ids=ids.to(device), attention_mask=attention.to(device)).logits.float()
        shifted = labels[:, 1:].to(device)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), shifted, ignore_index=IGNORE,
                                                 reduction="none")
        mask = shifted != IGNORE
        out += [(float(total), int(n)) for total, n in zip((loss * mask).sum(1), mask.sum(1))]
    return out


def mean_of(losses: list[tuple[float, int]]) -> float:
    """Mean cross-entropy per assistant token over examples."""
    count = sum(n for _, n in losses)
    if not count:
        raise DsftError("eval data has no assistant tokens to score")
    return sum(total for total, _ in losses) / count


def pair_scores(chosen: list[tuple[float, int]], rejected: list[tuple[float, int]]) -> dict[str, Any]:
    """Per pair, log p(chosen answer) - log p(rejected answer), summed over each answer's tokens (`accuracy`:
    share of pairs with a positive margin; `margin`: its mean) and per token (`normalized_accuracy`: the
    same with each answer's log-prob divided by its token count, so the shorter answer is not favoured)."""
    margins = [rc - cc for (cc, _), (rc, _) in zip(chosen, rejected, strict=True)]
    per_token = [rc / max(rn, 1) - cc / max(cn, 1) for (cc, cn), (rc, rn) in zip(chosen, rejected, strict=True)]
    return {"accuracy": sum(m > 0 for m in margins) / len(margins), "margin": sum(margins) / len(margins),
            "normalized_accuracy": sum(m > 0 for m in per_token) / len(per_token), "margins": margins}


IMPLICIT_BETA = 0.1  # the implicit reward's scale where the run's objective sets no beta (TRL's DPO default)


def implicit_rewards(policy: tuple[list, list], reference: tuple[list, list], beta: float) -> dict[str, Any]:
    """DPO's implicit reward, r(answer) = beta * (log p_policy(answer) - log p_reference(answer)) summed over
    the answer's tokens, per pair: `accuracy` the share with r(chosen) > r(rejected) (what DPO logs as
    rewards/accuracies), `margin` the mean r(chosen) - r(rejected)."""
    (pc, pr), (rc, rr) = policy, reference
    margins = [beta * ((rc_ - pc_) - (rr_ - pr_)) for (pc_, _), (pr_, _), (rc_, _), (rr_, _) in
               zip(pc, pr, rc, rr, strict=True)]
    return {"accuracy": sum(m > 0 for m in margins) / len(margins), "margin": sum(margins) / len(margins),
            "margins": margins}


def reference_of(recipe: Recipe) -> tuple[Path | None, float, str]:
    """(the adapter the run continued, whose frozen copy is its reference, or None for the base; beta;
    the reference's name) for the implicit reward."""
    from dsft.config.schema import sections
    from dsft.runs.run_dir import adapter_of

    init, beta = None, IMPLICIT_BETA
    for section in sections(recipe).values():
        if getattr(section, "init_adapter", None):
            init = adapter_of(Path(section.init_adapter))
        if section.implicit_reward_beta and getattr(section, "beta", None):
            beta = float(section.beta)
    return init, beta, (f"the adapter it continued ({init})" if init else "the base")


@torch.no_grad()
def answers(model: torch.nn.Module, tokenizer: Any, conversations: list[Messages], count: int,
            max_new_tokens: int, max_length: int | None = None) -> list[dict[str, str]]:
    from dsft.moe.fused import autocast_for

    device = next(model.parameters()).device
    out = []
    for messages in conversations[:count]:
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        prompt = tokenizer.apply_chat_template(messages[:last], tokenize=False, add_generation_prompt=True)
        ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"][-(max_length or 0):]], device=device)
        with autocast_for(model):
            generated = model.generate(input_ids=ids, max_new_tokens=max_new_tokens, do_sample=False,
                                       pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        out.append({"prompt": messages[last - 1]["content"], "reference": messages[last]["content"],
                    "answer": tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True)})
    return out


def evaluate(run: Path, data: str | list[str] | None = None, samples: int = 256, generations: int = 3,
             max_new_tokens: int = 48, force: bool = False, on_train: bool = False,
             rows_of: str | None = None) -> dict[str, Any]:
    """Score base and adapter on the same rows: loss per assistant token (pairs: on the chosen answer) and,
    for preference pairs, the log-prob margin chosen - rejected and its accuracy; routing drift; greedy
    answers. `run` is a run directory or one of its checkpoints; `rows_of` names whose rows `data` are when
    they are another run's (`--against`). Returns the report (write_report writes it)."""
    from dsft.adapters.lora import load_lora
    from dsft.models.load import load_model, load_tokenizer
    from dsft.runs import run_dir

    run = run_dir.run_of(run)
    recipe, adapter_dir, model_path = open_run(run, force, "evaluate")
    tokenizer = load_tokenizer(adapter_dir)
    kind, fmt, files = eval_rows(recipe, data, on_train or rows_of is not None)
    label = rows_of or ("--data" if data else "data.train (--on-train)" if on_train or not recipe.data.eval else "data.eval")
    prepared = prepare(Spec("pairs" if kind == "pairs" else "sft", files, fmt, label, recipe.data.system_prompt),
                       tokenizer, recipe.data.num_proc)
    count = min(samples, len(prepared))
    max_length = recipe.data.max_length  # every row cut to it, as training did
    tokens = prepared.rows(range(count), max_length)
    rejected = prepared.rejected(range(count), max_length) if kind == "pairs" else None
    truncated = int((prepared.column("length")[:count] > max_length).sum())
    if rejected is not None:
        truncated += int((prepared.column("rejected_length")[:count] > max_length).sum())
    conversations = first_conversations(files, kind, fmt, recipe.data.system_prompt, generations)
    batch = recipe.training.micro_batch_size
    pad = tokenizer.pad_token_id
    init, beta, reference_name = reference_of(recipe)
    reference = None
    if rejected is not None and init is not None:  # the continued adapter's log-probs first, then the run's
        reference = _reference_logps(recipe, model_path, init, tokens, rejected, batch, pad)
    model = load_lora(load_model(recipe.model, model_path), str(adapter_dir))
    model.eval()
    scored, drift = _score(model, tokens, rejected, batch, pad)
    implicit = None
    if rejected is not None:
        logps = {name: scored[name].pop("logps") for name in ("base", "adapter")}
        implicit = {"reference": reference_name, "beta": beta,
                    **implicit_rewards(logps["adapter"], reference or logps["base"], beta)}
    trained_on = [f for f in files if training_file(recipe, Path(f))]
    report = {
        "evaluated": run_dir.describe_checkpoint(adapter_dir) if adapter_dir.name.startswith("checkpoint-") else str(run),
        "run": str(run_dir.run_of_checkpoint(adapter_dir) or run),
        "data": files,
        "data_source": label,
        "data_kind": "training data" if trained_on else "held-out",  # of this run, whoever chose the rows
        "rows": kind,
        "examples": count,
        "max_length": max_length,
        "truncated": truncated,
        **scored,
        "implicit_reward": implicit,
        "routing_drift": drift,
        "answers": answers(model, tokenizer, conversations, generations, max_new_tokens, max_length),
    }
    return report


def _reference_logps(recipe, model_path: Path, init: Path, tokens, rejected, batch: int, pad: int) -> tuple:
    """The log-probs of chosen and rejected under the adapter a run continued (its training reference)."""
    from dsft.adapters.lora import load_lora
    from dsft.models.load import load_model

    if not (init / "adapter_config.json").is_file():
        raise DsftError(f"{init}: the adapter this run continued (its reference) is gone; eval needs it for the "
                        "implicit reward")
    ref_model = load_lora(load_model(recipe.model, model_path), str(init))
    ref_model.eval()
    return example_losses(ref_model, tokens, batch, pad), example_losses(ref_model, rejected, batch, pad)


def _score(model, tokens, rejected, batch: int, pad: int) -> tuple[dict[str, dict[str, Any]], dict]:
    """Base (the adapter off) and adapter: loss, perplexity, per-example loss, pair scores and log-probs of pair
    data; and the routing drift between them (none for a dense model)."""
    from dsft.moe import profile as routing_profile
    from dsft.moe.routing import routers, top_k

    moe = bool(routers(model))  # a dense model has no routing to drift
    scored: dict[str, dict[str, Any]] = {}
    routes = {}
    for name in ("base", "adapter"):
        with model.disable_adapter() if name == "base" else contextlib.nullcontext():
            losses = example_losses(model, tokens, batch, pad)
            loss = mean_of(losses)
            scored[name] = {"loss": loss, "perplexity": math.exp(min(loss, 50)),
                            "example_loss": [total / max(n, 1) for total, n in losses]}
            if rejected is not None:
                rejected_losses = example_losses(model, rejected, batch, pad)
                scored[name]["pairs"] = pair_scores(losses, rejected_losses)
                scored[name]["logps"] = (losses, rejected_losses)
            if moe:
                routes[name] = routing_profile.collect(model, tokens, batch_size=batch, pad_id=pad, progress=False)
    if not moe:
        return scored, {}
    k = top_k(model)
    return scored, routing_profile.load_moved(routing_profile.summarize(routes["base"], k, {}),
                                              routing_profile.summarize(routes["adapter"], k, {}))


def write_report(report: dict[str, Any], json_path: Path, figure: Any) -> None:
    """A report (eval or comparison) and its picture, each written beside and renamed into place."""
    from dsft.train.curves import save_figure

    save_figure(figure, json_path.with_suffix(".png"))
    write_atomic(json_path, json.dumps(report, indent=2) + "\n")


LOSS_UNIT = "loss (nats per assistant token)"
MARGIN_UNIT = "margin (nats, summed over the answer)"


def eval_figure(report: dict[str, Any], others: dict[str, dict[str, Any]] | None = None) -> Any:
    """Per example, sorted by the base's value: the loss (lower is better) of the base, the adapter and, when
    comparing, the other runs' adapters; for preference pairs also each pair's log-prob margin chosen -
    rejected. The title names the run(s) and what the rows are; the y axes carry their units."""
    from matplotlib.figure import Figure

    pairs = "pairs" in report["adapter"]
    runs = {"base": report["base"], _short(report): report["adapter"],
            **{_short(r): r["adapter"] for r in (others or {}).values()}}
    fig = Figure(figsize=(10.0 if pairs else 6.4, 4.2), layout="constrained")
    axes = fig.subplots(1, 2 if pairs else 1, squeeze=False)[0]
    panels = [("loss per example (lower is better)", "example_loss", LOSS_UNIT)]
    if pairs:
        panels.append(("margin log p(chosen) - log p(rejected) per pair", "margins", MARGIN_UNIT))
    for ax, (title, key, unit) in zip(axes, panels):
        values = {n: r["pairs"]["margins"] if key == "margins" else r[key] for n, r in runs.items()}
        order = sorted(range(len(values["base"])), key=lambda i: values["base"][i])
        for name, series in values.items():
            ax.plot(range(len(order)), [series[i] for i in order], marker="o", markersize=3,
                    linestyle="none" if len(order) > 1 else "-", label=name)
        if key == "margins":
            ax.axhline(0.0, color="grey", linewidth=0.8)
        ax.set_title(title)
        ax.set_xlabel("example (sorted by the base's value)")
        ax.set_ylabel(unit)
        ax.legend(fontsize="small")
    names = " vs ".join(n for n in runs if n != "base")
    fig.suptitle(f"dsft eval: {names}: {report['examples']} examples ({report['data_kind']}, {report['data_source']})",
                 fontsize="medium")
    return fig


def _short(report: dict[str, Any]) -> str:
    """A run's name on a picture: its directory's name (and the checkpoint's, when one was evaluated)."""
    run = Path(report.get("run") or "adapter").name
    evaluated = report.get("evaluated", "")
    return f"{run} {evaluated.split(' ')[0]}" if evaluated.startswith("checkpoint-") else run
