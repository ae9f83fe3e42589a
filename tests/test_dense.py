"""Dense DeepSeek models through the same commands: DeepSeek LLM / Coder (Llama layout, GQA and MHA, Llama
3.1 rope for R1-Distill-Llama) and R1-Distill-Qwen (Qwen2, q/k/v biases), on checkpoints laid out as
released: bf16 storage, sharded with an index, vocabulary padded past the tokenizer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from dsft.config.schema import ModelSection
from dsft.models.load import load_model, resolve_model_path
from dsft.models.stream import shard_files

LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 256}
LAYOUTS = {
    "llama-gqa": ("tiny-deepseek-llm", {}),
    "llama-mha": ("tiny-deepseek-llm", {"num_key_value_heads": 4}),
    "llama-3.1-rope": ("tiny-deepseek-llm", {"rope_scaling": LLAMA31_ROPE}),
    "qwen2-biases": ("tiny-r1-distill-qwen", {}),
    "qwen2-tied": ("tiny-r1-distill-qwen", {"tie_word_embeddings": True}),  # R1-Distill-Qwen-1.5B ties them
}


def released(tmp: Path, layout: str) -> Path:
    """The built-in dense model re-saved as releases ship: bf16, several shards with an index, the
    vocabulary padded to a multiple of 64 past the tokenizer's 1024 tokens, the layout's config."""
    name, changes = LAYOUTS[layout]
    src = resolve_model_path(f"builtin:{name}")
    config = json.loads((src / "config.json").read_text())
    config.update(changes, vocab_size=1088)
    torch.manual_seed(0)
    from transformers import AutoConfig

    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=torch.bfloat16)
    dst = tmp / layout
    model.save_pretrained(dst, max_shard_size="100KB")
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "chat_template", "special_tokens")):
            shutil.copy(f, dst / f.name)
    assert (dst / "model.safetensors.index.json").is_file() and len(shard_files(dst)) > 2
    return dst


def _linear_names(model: torch.nn.Module) -> tuple[list[str], list[str]]:
    import bitsandbytes as bnb

    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    return linear, [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not isinstance(m, bnb.nn.Linear4bit)]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_streaming_load_equals_transformers_and_nf4_covers_every_linear(layout: str, tmp_path: Path) -> None:
    path = released(tmp_path, layout)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = torch.randint(3, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    ours = load_model(ModelSection(path=str(path), dtype="float32"), path)
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, ref(ids).logits)  # bit for bit in fp32
    nf4 = load_model(ModelSection(path=str(path), dtype="float32", quantization="nf4"), path)
    linear, full = _linear_names(nf4)
    assert full == ["lm_head"] and len(linear) == 3 * 7 + 1  # q k v o gate up down per layer, and lm_head
    if layout == "qwen2-tied":
        assert nf4.lm_head.weight is nf4.model.embed_tokens.weight
    if layout == "qwen2-biases":
        assert nf4.model.layers[0].self_attn.q_proj.bias is not None


@pytest.mark.parametrize("layout", ["llama-gqa", "qwen2-biases", "qwen2-tied"])
def test_sft_dpo_and_merge_on_a_dense_release(layout: str, make_recipe, cli, tmp_path: Path) -> None:
    from conftest import REPO

    base = released(tmp_path, layout)
    recipe = make_recipe(model={"path": str(base), "quantization": "nf4"}, training={"max_steps": 12})
    result = cli("sft", "--recipe", recipe)
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    weights = load_file(run / "adapter/adapter_model.safetensors")
    lora = {k.removeprefix("base_model.model.").split(".lora_A")[0] for k in weights if ".lora_A." in k}
    assert lora == {f"model.layers.{i}.{m}" for i in range(3) for m in
                    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    meta = json.loads((run / "adapter/dsft_adapter.json").read_text())
    assert set(meta["groups"]) == {"attention", "dense_mlp"} and "routed_experts" not in meta
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert losses[-1] < losses[0] - 0.3

    pairs = str(REPO / "data_templates/legal/preference.jsonl")
    dpo = make_recipe("dpo.yaml", model={"path": str(base)}, data={"train": pairs, "format": "preference", "max_length": 160},
                      dpo={"max_prompt_length": 64, "init_adapter": str(run)}, training={"max_steps": 2},
                      output_dir=str(tmp_path / "dpo"))
    assert cli("dpo", "--recipe", dpo).exit_code == 0
    refused = cli("eval", "--adapter", run)
    assert refused.exit_code == 2 and "the run has no held-out data" in refused.output  # never training data silently
    evaluated = cli("eval", "--adapter", run, "--on-train", "--generations", 1, "--max-new-tokens", 4)
    assert evaluated.exit_code == 0, evaluated.output
    report = json.loads((run / "eval.json").read_text())
    assert report["adapter"]["loss"] < report["base"]["loss"] and report["routing_drift"] == {}
    assert report["data_kind"] == "training data" and "training data" in evaluated.output
    chat = cli("chat", "--adapter", run, "--prompt", "What is a deed?", "--max-new-tokens", 4)
    _, asked, answer = chat.output.partition("you> What is a deed?\n")  # after the loading line: the answer
    assert chat.exit_code == 0 and asked and answer.strip(), chat.output

    merged = cli("merge", "--adapter", run, "--out", tmp_path / "merged", "--verify")
    assert merged.exit_code == 0, merged.output
    header = lambda p: {k: (v.dtype, tuple(v.shape)) for s in shard_files(p) for k, v in load_file(s).items()}  # noqa: E731
    assert header(tmp_path / "merged") == header(base)  # the base's names, shapes and dtypes (bf16), its biases


def test_a_plain_peft_adapter_on_a_dense_base_merges_and_verifies(tmp_path: Path, cli) -> None:
    from peft import LoraConfig, get_peft_model

    base = released(tmp_path, "llama-gqa")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    peft_model.save_pretrained(tmp_path / "plain")
    result = cli("merge", "--adapter", tmp_path / "plain", "--base", base, "--out", tmp_path / "merged", "--verify")
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "merged/dsft-merge.json").read_text())
    assert record["touched_tensors"] == 3 * 3 and record["verify"]["ok"]


def test_groups_a_dense_model_lacks_are_field_errors_and_experts_commands_refuse(make_recipe, cli, tmp_path: Path) -> None:
    recipe = make_recipe(model={"path": "builtin:tiny-deepseek-llm"}, training={"max_steps": 1})
    for setting, message in (("adapter.routed_experts=all", "adapter.routed_experts: this model has no routed experts"),
                             ("adapter.shared_experts=true", "adapter.shared_experts: this llama model has no shared experts"),
                             ("adapter.router=trainable", "adapter.router: this llama model has no router")):
        result = cli("sft", "--recipe", recipe, "--set", setting)
        assert result.exit_code == 2 and message in result.output, result.output
    result = cli("experts", "plan", "--recipe", recipe)
    assert result.exit_code == 2 and "dense llama model with no routed experts" in result.output
    assert not (tmp_path / "run").exists()
    assert cli("sft", "--recipe", recipe).exit_code == 0  # the defaults (shared_experts on) do not fail


DEEPSEEK_LLM_67B = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 8192,
                    "num_hidden_layers": 95, "num_attention_heads": 64, "num_key_value_heads": 8,
                    "intermediate_size": 22016, "vocab_size": 102400, "rms_norm_eps": 1e-6, "rope_theta": 10000,
                    "max_position_embeddings": 4096, "torch_dtype": "bfloat16"}


def test_the_67b_recipe_fits_one_80gb_gpu_by_the_plan() -> None:
    import re

    from conftest import REPO
    from dsft.adapters.plan import build_plan
    from dsft.config import load_recipe

    path = REPO / "recipes/deepseek-llm-67b-legal.yaml"
    plan = build_plan(load_recipe(path), DEEPSEEK_LLM_67B, {})
    assert set(plan["groups"]) == {"attention", "dense_mlp"}
    assert plan["weights"]["expert_params"] == 0 and plan["weights"]["full_precision_params"] == 2 * 102400 * 8192
    peak = plan["memory"]["peak_gib"]
    stated = float(re.search(r"~(\d+) GiB peak", path.read_text()).group(1))
    assert abs(peak - stated) < 1 and peak < 80


@pytest.mark.parametrize("template, opened", [("r1-distill.jinja", True), ("r1-distill-2501.jinja", False)])
def test_r1_reasoning_is_trained_on_exactly_the_final_turn(template: str, opened: bool) -> None:
    """R1-Distill's templates drop `...</think>` from every assistant turn. The final turn's reasoning and
    answer are trained on as written, after the generation prompt (which in the newer revision already
    opens `<think>\\n`, not repeated), with one BOS; earlier turns keep the template's rendering."""
    from conftest import REPO
    from dsft.data.tokenize import IGNORE, tokenize_conversation
    from dsft.models.load import load_tokenizer

    tok = load_tokenizer(resolve_model_path("builtin:tiny-r1-distill-qwen"), str(REPO / "data_templates/chat_templates" / template))
    messages = [{"role": "user", "content": "What is a deed?"},
                {"role": "assistant", "content": "<think>\nold reasoning\n</think>\n\nAn instrument."},
                {"role": "user", "content": "And a lease?"},
                {"role": "assistant", "content": "<think>\nA lease grants use.\n</think>\n\nA contract for use of land."}]
    out = tokenize_conversation(tok, messages, None, True)
    ids, labels = out["input_ids"], out["labels"]
    prompt = tok.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<｜Assistant｜><think>\n" if opened else "<｜Assistant｜>")
    trained = ("" if opened else "<think>\n") + "A lease grants use.\n</think>\n\nA contract for use of land.<｜end▁of▁sentence｜>"
    expected = tok(prompt + trained, add_special_tokens=False)["input_ids"]
    assert ids == expected and tok.decode(ids).count("<｜begin▁of▁sentence｜>") == 1
    rendered = messages[1]["content"].split("</think>")[-1]  # what the template keeps of the first turn
    first_answer = tok(rendered + "<｜end▁of▁sentence｜>", add_special_tokens=False)["input_ids"]
    final = tok(trained, add_special_tokens=False)["input_ids"]
    on_loss = [i for i, label in zip(ids, labels) if label != IGNORE]
    assert on_loss == first_answer + final  # token by token: the first answer as rendered, the final turn as written
    assert "old reasoning" not in tok.decode(ids)  # history is rendered by the template, reasoning dropped
    assert all(label in (IGNORE, i) for i, label in zip(ids, labels))


R1_DISTILL_QWEN_7B = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": 3584,
                      "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
                      "intermediate_size": 18944, "vocab_size": 152064, "rms_norm_eps": 1e-6, "rope_theta": 10000,
                      "max_position_embeddings": 131072, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}


def test_the_r1_distill_recipe_states_its_plan_estimate() -> None:
    import re

    from conftest import REPO
    from dsft.adapters.plan import build_plan
    from dsft.config import load_recipe

    path = REPO / "recipes/r1-distill-qwen-7b-medical.yaml"
    plan = build_plan(load_recipe(path), R1_DISTILL_QWEN_7B, {})
    stated = float(re.search(r"~(\d+) GiB peak", path.read_text()).group(1))
    assert abs(plan["memory"]["peak_gib"] - stated) < 1 and plan["memory"]["peak_gib"] < 24


def test_sft_on_r1_style_rows_trains_the_reasoning(make_recipe, cli, tmp_path: Path) -> None:
    from conftest import REPO, write_jsonl

    rows = [{"messages": [{"role": "user", "content": f"Is {d} a term of art?"},
                          {"role": "assistant", "content": f"<think>\nRecall {d}.\n</think>\n\nYes, {d} is."}]}
            for d in ("deed", "lease", "tort", "lien", "writ", "bond", "plea", "levy")]
    train = write_jsonl(tmp_path / "r1.jsonl", rows)
    recipe = make_recipe(model={"path": "builtin:tiny-r1-distill-qwen"},
                         data={"train": str(train), "chat_template": str(REPO / "data_templates/chat_templates/r1-distill.jinja")},
                         training={"max_steps": 10, "logging_steps": 1})
    result = cli("sft", "--recipe", recipe)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "run/run.json").read_text())["summary"]
    # every loss token of a row: the reasoning and the answer (not only the answer the template keeps)
    from dsft.models.load import load_tokenizer

    tok = load_tokenizer(resolve_model_path("builtin:tiny-r1-distill-qwen"))
    trained = sum(len(tok(f"Recall {d}.\n</think>\n\nYes, {d} is.<｜end▁of▁sentence｜>", add_special_tokens=False)["input_ids"])
                  for d in ("deed", "lease", "tort", "lien", "writ", "bond", "plea", "levy"))
    assert summary["loss_tokens"] == trained and summary["last_loss"] < summary["first_loss"]
