"""`dsft eval`: judge a run before deploying it.

Held-out loss and perplexity of the base and of base + adapter on the same assistant tokens, a few
greedy answers to held-out prompts, and the routing drift (how much of each layer's expert load the
adapter moved). Reads the run's recipe; writes RUN/eval.json.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from dsft.config.schema import Recipe
from dsft.data.formats import Messages, load_conversations
from dsft.data.tokenize import IGNORE, tokenize_all
from dsft.errors import DsftError


def open_run(run: Path, force: bool = False, command: str = "evaluate") -> tuple[Recipe, Path, Path]:
    """(recipe, adapter directory, base model path) of a finished run, every file checked before a model
    is loaded: not while it trains, a failed or interrupted one only with --force, the adapter's files,
    and the base it names is still the model the adapter was trained on."""
    from dsft.adapters.metadata import check_adapter_dir, identity_mismatches, read_metadata
    from dsft.models.check import check_checkpoint
    from dsft.models.files import model_dir_error, read_model_config
    from dsft.models.load import resolve_model_path
    from dsft.train.run_dir import RunDir

    if not run.is_dir():
        raise DsftError(f"--adapter {run}: no such run directory; give the output_dir of a dsft sft or dpo run")
    rundir = RunDir(run)
    recipe = rundir.recipe()
    rundir.check_usable(force, command)
    adapter_dir = rundir.adapter
    if not (adapter_dir / "adapter_config.json").is_file():
        raise DsftError(f"--adapter {run}: the run has no adapter/ (it never finished); resume or train it first")
    check_adapter_dir(adapter_dir)
    model_path = resolve_model_path(recipe.model.path)
    key = f"{rundir.recipe_file}: model.path"
    model_dir_error(model_path, key, tokenizer=False)
    wrong = identity_mismatches(read_model_config(model_path), read_metadata(adapter_dir))
    if wrong:
        raise DsftError(f"{key}: {model_path} is not the model this adapter was trained on: {'; '.join(wrong)}; "
                        "restore that checkpoint there")
    check_checkpoint(model_path, key)
    return recipe, adapter_dir, model_path


def _conversations(recipe: Recipe, data: str | None, on_train: bool = False) -> list[Messages]:
    d = recipe.data
    if data and not Path(data).is_file():
        raise DsftError(f"--data {data}: file not found")
    if not data and not d.eval and not on_train:
        raise DsftError(f"--data: the run has no held-out data (its recipe sets no data.eval); pass --data FILE with "
                        "rows it did not train on, or --on-train to score its training data (not a held-out measure)")
    files = [data] if data else (d.eval or d.train)
    if d.format == "preference":
        from dsft.data.preference import load_pairs

        return [p["prompt"] + p["chosen"] for p in load_pairs(files)]
    return load_conversations(files, d.format, d.system_prompt)


@torch.no_grad()
def mean_loss(model: torch.nn.Module, tokens: dict[str, list[list[int]]], batch_size: int, pad_id: int) -> float:
    """Mean cross-entropy per assistant token."""
    from dsft.moe.fused import autocast_for
    from dsft.moe.profile import batches

    device = next(model.parameters()).device
    total, count = 0.0, 0
    for ids, attention, labels in batches(tokens, batch_size, pad_id):
        with autocast_for(model):
            logits = model(input_ids=ids.to(device), attention_mask=attention.to(device)).logits.float()
        shifted = labels[:, 1:].to(device)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), shifted.reshape(-1),
                                                 ignore_index=IGNORE, reduction="sum")
        total += float(loss)
        count += int((shifted != IGNORE).sum())
    if not count:
        raise DsftError("eval data has no assistant tokens to score")
    return total / count


@torch.no_grad()
def answers(model: torch.nn.Module, tokenizer: Any, conversations: list[Messages], count: int,
            max_new_tokens: int) -> list[dict[str, str]]:
    from dsft.moe.fused import autocast_for

    device = next(model.parameters()).device
    out = []
    for messages in conversations[:count]:
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        prompt = tokenizer.apply_chat_template(messages[:last], tokenize=False, add_generation_prompt=True)
        ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]], device=device)
        with autocast_for(model):
            generated = model.generate(input_ids=ids, max_new_tokens=max_new_tokens, do_sample=False,
                                       pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        out.append({"prompt": messages[last - 1]["content"], "reference": messages[last]["content"],
                    "answer": tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True)})
    return out


def evaluate(run: Path, data: str | None = None, samples: int = 256, generations: int = 3,
             max_new_tokens: int = 48, force: bool = False, on_train: bool = False) -> dict[str, Any]:
    from dsft.adapters.lora import load_lora
    from dsft.models.load import load_model, load_tokenizer
    from dsft.moe import profile as routing_profile
    from dsft.moe.routing import routers, top_k

    from dsft.outputs import check_writable

    recipe, adapter_dir, model_path = open_run(run, force, "evaluate")
    check_writable(run, "--adapter")  # eval.json goes there
    tokenizer = load_tokenizer(adapter_dir)
    conversations = _conversations(recipe, data, on_train)[:samples]
    tokens = tokenize_all(tokenizer, conversations, None, True)
    model = load_lora(load_model(recipe.model, model_path), str(adapter_dir))
    model.eval()
    batch = recipe.training.micro_batch_size
    pad = tokenizer.pad_token_id
    moe = bool(routers(model))  # a dense model has no routing to drift
    with model.disable_adapter():
        base_loss = mean_loss(model, tokens, batch, pad)
        base_routes = routing_profile.collect(model, tokens, batch_size=batch, pad_id=pad, progress=False) if moe else {}
    adapter_loss = mean_loss(model, tokens, batch, pad)
    drift = {}
    if moe:
        adapter_routes = routing_profile.collect(model, tokens, batch_size=batch, pad_id=pad, progress=False)
        k = top_k(model)
        drift = routing_profile.load_moved(routing_profile.summarize(base_routes, k, {}),
                                           routing_profile.summarize(adapter_routes, k, {}))
    report = {
        "data": data or (recipe.data.eval or recipe.data.train),
        "data_kind": "given" if data else "held-out" if recipe.data.eval else "training data",
        "examples": len(conversations),
        "base": {"loss": base_loss, "perplexity": math.exp(min(base_loss, 50))},
        "adapter": {"loss": adapter_loss, "perplexity": math.exp(min(adapter_loss, 50))},
        "routing_drift": drift,
        "answers": answers(model, tokenizer, conversations, generations, max_new_tokens),
    }
    tmp = run / ".eval.json.tmp"
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(run / "eval.json")
    return report
