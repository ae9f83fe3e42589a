"""Whole-model MoE QLoRA: streaming load, NF4 everywhere, expert LoRA on chosen experts, as PEFT adapters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from dsft.adapters.lora import attach_lora, load_lora
from dsft.config.schema import AdapterSection, ModelSection
from dsft.models.load import load_model, resolve_model_path
from dsft.models.stream import load_streaming
from dsft.moe.experts import DsftExperts
from dsft.moe.lora import ExpertLoraLayer

CPU = torch.device("cpu")


def _load(name: str = "tiny-deepseek-v3", quantization: str = "none"):
    section = ModelSection(path=f"builtin:{name}", dtype="float32", quantization=quantization)
    return load_model(section, resolve_model_path(section.path))


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 1000, (2, 24), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ["tiny-deepseek-v3", "tiny-deepseek-v2"])
def test_streaming_load_equals_from_pretrained(name: str) -> None:
    ref = AutoModelForCausalLM.from_pretrained(resolve_model_path(f"builtin:{name}"), dtype=torch.float32)
    ours = _load(name)
    with torch.no_grad():
        torch.testing.assert_close(ours(_ids()).logits, ref(_ids()).logits, rtol=1e-4, atol=1e-5)


def test_nf4_quantizes_every_routed_expert_and_linear() -> None:
    import bitsandbytes as bnb

    model = _load(quantization="nf4")
    experts = [m for m in model.modules() if isinstance(m, DsftExperts)]
    moe_layers = model.config.num_hidden_layers - model.config.first_k_dense_replace
    assert len(experts) == moe_layers and all(e.quantized for e in experts)
    assert not [n for n, p in model.named_parameters() if p.dim() == 3]
    linears = {n: type(m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    full = sorted(n for n, t in linears.items() if t is not bnb.nn.Linear4bit)
    assert full == ["lm_head"], full
    for layer in model.model.layers[1:]:
        assert layer.mlp.gate.weight.dtype == torch.float32
    assert model.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
    from dsft.train.sft import model_params

    unquantized = _load()
    assert model_params(model) == model_params(unquantized) == sum(p.numel() for p in unquantized.parameters())


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_training_step_touches_only_selected_experts(quantization: str) -> None:
    model = _load(quantization=quantization)
    adapter = AdapterSection(r=4, alpha=8, attention=False, shared_experts=False, dense_mlp=False,
                             routed_experts={"experts": {1: [0, 3]}})
    peft_model, targets = attach_lora(model, adapter, {1: [0, 3]})
    assert targets == {"routed_experts": ["model.layers.1.mlp.experts"]}
    frozen = {n: t.clone() for n, t in (*peft_model.named_parameters(), *peft_model.named_buffers()) if "lora_" not in n}
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert sorted(n.split("experts.")[1] for n in trainable) == [
        "lora_down_A.default.weight", "lora_down_B.default.weight", "lora_gate_up_A.default.weight",
        "lora_gate_up_B.default.weight"]
    assert all(p.shape[0] == 2 and p.dtype == torch.float32 for p in trainable.values())
    for p in trainable.values():  # B starts at zero: give it values so every factor gets a gradient
        torch.nn.init.normal_(p, std=0.1)
    before = {n: p.detach().clone() for n, p in trainable.items()}

    optimizer = torch.optim.SGD(trainable.values(), lr=0.1)
    ids = _ids()
    peft_model(ids, labels=ids).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.values())
    optimizer.step()
    for n, p in trainable.items():
        assert not torch.equal(p, before[n]), n
    for n, t in (*peft_model.named_parameters(), *peft_model.named_buffers()):
        if "lora_" not in n:
            assert torch.equal(t, frozen[n]), f"{n} changed"


def test_unselected_experts_see_the_base_only() -> None:
    model = _load()
    experts = model.model.layers[1].mlp.experts
    x = torch.randn(30, 64)
    idx = torch.tensor([[1, 2]] * 30)  # routed to experts without LoRA
    base = experts(x, idx, torch.ones(30, 2))
    peft_model, _ = attach_lora(model, AdapterSection(attention=False, shared_experts=False, dense_mlp=False,
                                                      routed_experts="all"), {1: [0, 3]})
    layer = peft_model.base_model.model.model.layers[1].mlp.experts
    for p in layer.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)
    torch.testing.assert_close(layer(x, idx, torch.ones(30, 2)), base)
    assert not torch.allclose(layer(x, torch.tensor([[0, 2]] * 30), torch.ones(30, 2)),
                              experts(x, torch.tensor([[0, 2]] * 30), torch.ones(30, 2)))


def test_expert_lora_disable_and_named_adapters() -> None:
    model = _load()
    peft_model, _ = attach_lora(model, AdapterSection(routed_experts="all"), {1: None, 2: None})
    for p in peft_model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    layer = peft_model.base_model.model.model.layers[2].mlp.experts
    assert isinstance(layer, ExpertLoraLayer) and layer.lora_experts["default"] == list(range(8))
    x, idx, w = torch.randn(16, 64), torch.randint(0, 8, (16, 2)), torch.rand(16, 2)
    with torch.no_grad():
        adapted = layer(x, idx, w)
        base = layer.get_base_layer()(x, idx, w)
        with peft_model.disable_adapter():
            torch.testing.assert_close(layer(x, idx, w), base)
            disabled_logits = peft_model(_ids()).logits
        assert not torch.allclose(adapted, base)
        torch.testing.assert_close(disabled_logits, _load()(_ids()).logits)

        peft_model.add_adapter("ref", peft_model.peft_config["default"])
        peft_model.set_adapter("ref")  # fresh adapter: B = 0, so the expert path is the base again
        torch.testing.assert_close(layer(x, idx, w), base)
        for name in ExpertLoraLayer.adapter_layer_names:
            if "ref" in getattr(layer, name):
                getattr(layer, name)["ref"].weight.data.copy_(getattr(layer, name)["default"].weight.data)
        torch.testing.assert_close(layer(x, idx, w), adapted)
        getattr(layer, "lora_down_B")["ref"].weight.data.mul_(2)
        assert not torch.allclose(layer(x, idx, w), adapted)
        peft_model.set_adapter("default")
        torch.testing.assert_close(layer(x, idx, w), adapted)


def test_subset_recipe_trains_and_saves_exactly_those_experts(make_recipe, cli, tmp_path: Path) -> None:
    recipe = make_recipe(model={"quantization": "nf4"}, training={"max_steps": 6},
                         adapter={"routed_experts": {1: [0, 3]}})
    result = cli("sft", "--recipe", recipe)
    assert result.exit_code == 0, result.output
    adapter = tmp_path / "run/adapter"
    weights = load_file(adapter / "adapter_model.safetensors")
    expert_keys = sorted(k for k in weights if ".mlp.experts." in k)
    assert expert_keys == [f"base_model.model.model.layers.1.mlp.experts.lora_{p}.weight" for p in
                           ("down_A", "down_B", "gate_up_A", "gate_up_B")]
    assert all(weights[k].shape[0] == 2 and weights[k].dtype == torch.float32 for k in expert_keys)
    assert weights["base_model.model.model.layers.1.mlp.experts.lora_down_B.weight"].abs().sum() > 0
    meta = json.loads((adapter / "dsft_adapter.json").read_text())
    assert meta["routed_experts"]["experts"] == {"1": [0, 3]}
    assert meta["base_model"]["model_type"] == "deepseek_v3"

    reloaded = load_lora(_load(quantization="nf4"), str(adapter))
    layer = reloaded.base_model.model.model.layers[1].mlp.experts
    assert isinstance(layer, ExpertLoraLayer) and layer.lora_experts["default"] == [0, 3]
    torch.testing.assert_close(layer.lora_down_B["default"].weight.detach(), weights[expert_keys[1]])
    assert not isinstance(reloaded.base_model.model.model.layers[2].mlp.experts, ExpertLoraLayer)


def _fp8_checkpoint(src: Path, dst: Path) -> dict[str, torch.Tensor]:
    """Rewrite a tiny checkpoint as DeepSeek-V3 ships it: projection weights in FP8 e4m3 with one
    `weight_scale_inv` per tile (128x128 in V3; 32x32 here to fit the tiny shapes)."""
    dst.mkdir()
    block = 32
    tensors, expected = {}, {}
    for key, t in load_file(src / "model.safetensors").items():
        if t.dim() == 2 and key.endswith("proj.weight") and "norm" not in key:
            rows, cols = t.shape
            grid = torch.zeros((rows + block - 1) // block, (cols + block - 1) // block)
            for i in range(grid.shape[0]):
                for j in range(grid.shape[1]):
                    grid[i, j] = t[i * block:(i + 1) * block, j * block:(j + 1) * block].abs().max() / 448
            scale = grid.repeat_interleave(block, 0)[:rows].repeat_interleave(block, 1)[:, :cols]
            fp8 = (t / scale).to(torch.float8_e4m3fn)
            tensors[key], tensors[key + "_scale_inv"] = fp8, grid
            expected[key] = fp8.float() * scale
        else:
            tensors[key] = t
            expected[key] = t
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [block, block],
                                     "activation_scheme": "dynamic"}
    (dst / "config.json").write_text(json.dumps(config))
    for f in src.iterdir():
        if f.name not in ("config.json", "model.safetensors"):
            (dst / f.name).write_bytes(f.read_bytes())
    return expected


def test_fp8_block_scaled_checkpoint_loads(tmp_path: Path) -> None:
    src = resolve_model_path("builtin:tiny-deepseek-v3")
    expected = _fp8_checkpoint(src, tmp_path / "fp8")
    model = load_streaming(tmp_path / "fp8", torch.float32, quantized=False, device=CPU)
    state = model.state_dict()
    torch.testing.assert_close(state["model.layers.1.self_attn.o_proj.weight"], expected["model.layers.1.self_attn.o_proj.weight"])
    gate = torch.stack([expected[f"model.layers.2.mlp.experts.{e}.gate_proj.weight"] for e in range(8)])
    torch.testing.assert_close(state["model.layers.2.mlp.experts.gate_up_proj"][:, :32], gate)
    assert not hasattr(model.config, "quantization_config")

    nf4 = load_streaming(tmp_path / "fp8", torch.float32, quantized=True, device=CPU)
    assert all(m.quantized for m in nf4.modules() if isinstance(m, DsftExperts))
    with torch.no_grad():
        assert torch.isfinite(nf4(_ids()).logits).all()


def test_checkpoint_mismatch_is_a_clear_error(tmp_path: Path) -> None:
    from dsft.errors import DsftError

    src = resolve_model_path("builtin:tiny-deepseek-v3")
    dst = tmp_path / "broken"
    dst.mkdir()
    tensors = load_file(src / "model.safetensors")
    del tensors["model.layers.2.mlp.experts.5.up_proj.weight"]
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    (dst / "config.json").write_bytes((src / "config.json").read_bytes())
    with pytest.raises(DsftError, match="checkpoint is missing"):
        load_streaming(dst, torch.float32, quantized=False, device=CPU)


def test_trainer_style_checkpoint_restore(tmp_path: Path) -> None:
    """transformers' Trainer resumes a PEFT run with model.load_adapter(checkpoint, "default")."""
    adapter = AdapterSection(r=4, alpha=8, routed_experts={1: [0, 3]})
    trained, targets = attach_lora(_load(), adapter, {1: [0, 3]})
    for p in trained.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)
    trained.save_pretrained(tmp_path / "checkpoint-2")
    fresh, _ = attach_lora(_load(), adapter, {1: [0, 3]})
    result = fresh.load_adapter(str(tmp_path / "checkpoint-2"), "default", is_trainable=True)
    assert not result.missing_keys and not result.unexpected_keys
    want = {n: p for n, p in trained.named_parameters() if p.requires_grad}
    got = {n: p for n, p in fresh.named_parameters() if p.requires_grad}
    assert want.keys() == got.keys() and any("shared_experts" in n for n in got)
    for name in want:
        assert torch.equal(got[name], want[name]), name


# NF4 as the QLoRA paper defines it (bitsandbytes' table): 16 levels in [-1, 1], a 64-weight block scaled by its
# absolute maximum, each weight stored as the index of the nearest level; two indices a byte, the first high.
NF4_LEVELS = torch.tensor([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                           -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                           0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                           0.7229568362236023, 1.0])


def _nf4_reference(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the level indices, the dequantized weight) of `weight` in 64-weight blocks, in plain torch."""
    blocks = weight.reshape(-1, 64).float()
    absmax = blocks.abs().amax(1, keepdim=True)
    index = ((blocks / absmax).unsqueeze(-1) - NF4_LEVELS).abs().argmin(-1)
    return index.reshape(-1), (NF4_LEVELS[index] * absmax).reshape(weight.shape)


@pytest.mark.parametrize("shape", [(8, 64, 32), (8, 32, 64), (4, 128, 16), (2, 96, 64)],
                         ids=["down-in-32", "gate-up", "in-16", "odd-rows"])
def test_packed_nf4_matches_an_independent_nf4_reference(shape: tuple[int, ...]) -> None:
    """dsft's expert storage against NF4 computed here without bitsandbytes, at the tiny models' shapes (a last
    dimension under 64 among them: bitsandbytes 0.50.2's CPU dequantization was reported wrong there, which a test
    comparing NF4 with NF4 cannot see): the same 4-bit codes, and the dequantized weight within the error of the
    double-quantized block scales (8-bit, a fraction of a percent of the block's maximum)."""
    from dsft.moe.nf4 import PackedNF4

    weight = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape)))
    packed = PackedNF4(weight, torch.float32)
    index, expected = _nf4_reference(weight)
    stored = packed.codes.view(-1)
    assert torch.equal(torch.stack([stored >> 4, stored & 15], 1).reshape(-1).long(), index)
    got = packed.dequantize()
    assert got.shape == weight.shape
    scale = weight.reshape(-1, 64).abs().amax(1, keepdim=True)
    assert ((got - expected).reshape(-1, 64).abs() <= 0.01 * scale).all(), float((got - expected).abs().max())
    assert ((got - weight).reshape(-1, 64).abs() <= 0.2 * scale).all()  # NF4's own rounding: at most ~0.16 of a block's maximum


@pytest.mark.parametrize("layout", ["per-expert", "fused", "released"])
def test_a_rank_loads_only_its_block_of_experts(layout: str, tmp_path: Path) -> None:
    """load_streaming's expert_part (expert parallelism's rank 1 of 2): from DeepSeek's per-expert layout only
    experts 4-7's tensors are read, from transformers' fused one only rows 4-7 of each fused tensor; the module
    holds those experts, its NF4 bytes the rows of the whole layer's, and it says which rows it holds. `released`:
    the per-expert layout as DeepSeek-V3 ships it (FP8 experts with block scales, sharded with an index, an MTP
    layer that is skipped, vocab padded past the tokenizer)."""
    from conftest import fused_checkpoint, released_v3
    from dsft.models import stream
    from dsft.models.load import resolve_model_path
    from dsft.moe.experts import DsftExperts

    path = {"per-expert": lambda: resolve_model_path("builtin:tiny-deepseek-v3"), "fused": lambda: fused_checkpoint(tmp_path),
            "released": lambda: released_v3(tmp_path)}[layout]()
    reads: list[tuple[str, slice | None]] = []
    original = stream.StreamLoader._tensor

    def counting(self, handle, key, keys, rows=None):  # noqa: ANN001, ANN202
        reads.append((key, rows))
        return original(self, handle, key, keys, rows)

    whole = stream.load_streaming(path, torch.float32, True, torch.device("cpu"))
    stream.StreamLoader._tensor = counting
    try:
        half = stream.load_streaming(path, torch.float32, True, torch.device("cpu"), expert_part=(1, 2))
    finally:
        stream.StreamLoader._tensor = original
    expert_reads = [(k, rows) for k, rows in reads if ".experts." in k]
    if layout != "fused":
        assert {int(k.split(".experts.")[1].split(".")[0]) for k, _ in expert_reads} == {4, 5, 6, 7}
    else:
        assert expert_reads and all(rows == slice(4, 8) for _, rows in expert_reads)
    pairs = [(a, b) for a, b in zip(whole.modules(), half.modules()) if isinstance(a, DsftExperts)]
    assert len(pairs) == 2
    for a, b in pairs:
        assert (b.first_expert, b.global_experts, b.num_experts) == (4, 8, 4)
        for name in ("codes", "scales", "scale_state"):
            assert torch.equal(getattr(b.gate_up_nf4, name), getattr(a.gate_up_nf4, name)[4:])
            assert torch.equal(getattr(b.down_nf4, name), getattr(a.down_nf4, name)[4:])


@pytest.mark.parametrize("layout", ["per-expert", "released"])
def test_the_rest_read_later_equals_the_whole_load(layout: str, tmp_path: Path) -> None:
    """`rest_later` (training.parallel): every weight outside the routed experts is a placeholder holding one element
    until dsft.models.shards.read_rest reads it; read whole (as a routing profile does before the layout), the model is
    the whole load's, NF4 codes and quantization state bit for bit; `released`: FP8 projections with partial scale
    blocks, dequantized on the way."""
    import bitsandbytes as bnb

    from conftest import released_v3
    from dsft.models.shards import pending, read_rest

    path = resolve_model_path("builtin:tiny-deepseek-v3") if layout == "per-expert" else released_v3(tmp_path)
    whole = load_streaming(path, torch.float32, True, torch.device("cpu"))
    later = load_streaming(path, torch.float32, True, torch.device("cpu"), rest_later=True)
    waiting = [p for n, p in later.named_parameters() if ".experts." not in n]
    assert pending(later) == len(waiting) > 0
    assert all(p.untyped_storage().nbytes() <= 4 for p in waiting)  # one element each, whatever the shape
    read_rest(later)
    assert pending(later) == 0
    theirs = dict(whole.named_parameters())
    for name, param in later.named_parameters():
        assert torch.equal(param, theirs[name]), name
    linears = [(a, b) for a, b in zip(whole.modules(), later.modules()) if isinstance(a, bnb.nn.Linear4bit)]
    assert linears
    for a, b in linears:
        mine, ref = b.weight.quant_state, a.weight.quant_state
        assert mine is b.quant_state and mine.shape == ref.shape and mine.dtype == ref.dtype
        for field in ("absmax", "offset", "code"):
            assert torch.equal(getattr(mine, field), getattr(ref, field))
        assert torch.equal(mine.state2.absmax, ref.state2.absmax)
    ids = torch.randint(0, 1000, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(later(input_ids=ids).logits, whole(input_ids=ids).logits)


def test_a_tied_lm_head_follows_its_placeholder(tmp_path: Path) -> None:
    """A checkpoint whose LM head shares the embeddings (tie_word_embeddings: R1-Distill-Qwen-1.5B's Qwen2 base), loaded
    with `rest_later`: the head stays the embeddings' parameter through to_meta and read_rest, and the model equals
    the whole load."""
    import json

    from transformers import AutoConfig

    from dsft.models.shards import read_rest, to_meta

    src = resolve_model_path("builtin:tiny-r1-distill-qwen")
    config = {**json.loads((src / "config.json").read_text()), "tie_word_embeddings": True}
    spec = {k: v for k, v in config.items() if k not in ("architectures", "transformers_version", "model_type")}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(config["model_type"], **spec), dtype=torch.float32)
    model.save_pretrained(tmp_path / "tied")
    whole = load_streaming(tmp_path / "tied", torch.float32, False, torch.device("cpu"))
    later = load_streaming(tmp_path / "tied", torch.float32, False, torch.device("cpu"), rest_later=True)
    assert later.lm_head.weight is later.model.embed_tokens.weight
    to_meta(later)
    assert later.lm_head.weight is later.model.embed_tokens.weight and later.lm_head.weight.is_meta
    read_rest(later)
    assert later.lm_head.weight is later.model.embed_tokens.weight
    assert torch.equal(later.lm_head.weight, whole.lm_head.weight)


@pytest.mark.parametrize("shape,ranks", [((3, 64), 2), ((5, 48), 2), ((40, 64), 3), ((7, 100), 4)])
def test_an_nf4_shard_straddling_quantization_blocks_equals_one_process(shape: tuple[int, int], ranks: int,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """dsft.models.shards' NF4 read for FSDP2 shards whose packed-code boundaries fall inside a 64-element
    quantization block (rows not dividing by the ranks, rows shorter than a block, a last partial block): each
    simulated rank quantizes the rows under its blocks alone, the blocks' maxima are combined as the all-reduce
    combines them, and the ranks' codes put together and every rank's quantization state equal bitsandbytes
    quantizing the whole weight."""
    import bitsandbytes as bnb
    import torch.distributed as dist

    from dsft.models import shards

    weight = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    whole = bnb.nn.Params4bit(weight.clone(), requires_grad=False, quant_type="nf4", blocksize=64,
                              compress_statistics=True).to("cpu")
    packed = whole.shape[0]
    chunk = -(-packed // ranks)  # FSDP2's (torch.chunk's) split of the packed codes on dim 0
    spans = [(r * chunk, max(0, min(packed, (r + 1) * chunk) - r * chunk)) for r in range(ranks)]

    class Rows:
        key = "w"

        def __call__(self, lo: int, hi: int) -> torch.Tensor:
            return weight[lo:hi]

    def on_rank(rank: int, absmax_of_all: list[torch.Tensor]) -> tuple[torch.Tensor, object]:
        module = bnb.nn.Linear4bit(shape[1], shape[0], bias=False, quant_type="nf4")
        module.dsft_nf4_shape = (shape, torch.float32)
        lo, n = spans[rank]
        local = torch.zeros(n, 1, dtype=torch.uint8)
        monkeypatch.setattr(shards, "_shard", lambda param: (local, lo, n))
        seen = []

        def all_reduce(tensor: torch.Tensor, op: object = None) -> None:  # MAX over every rank's blocks
            seen.append(tensor.clone())
            if absmax_of_all:
                tensor.copy_(torch.stack(absmax_of_all).amax(0))

        monkeypatch.setattr(dist, "all_reduce", all_reduce)
        shards._read_nf4(module, module.weight, Rows(), torch.device("cpu"))
        absmax_of_all.extend([] if len(absmax_of_all) == ranks else seen)
        return local, module.quant_state

    partial: list[torch.Tensor] = []
    for rank in range(ranks):  # each rank's own blocks' maxima, as it hands them to the all-reduce
        on_rank(rank, partial)
    results = [on_rank(rank, partial) for rank in range(ranks)]
    assert torch.equal(torch.cat([codes for codes, _ in results]), whole.data)
    ref = whole.quant_state
    for _, state in results:
        assert state.shape == ref.shape and torch.equal(state.absmax, ref.absmax) and torch.equal(state.offset, ref.offset)
        assert torch.equal(state.state2.absmax, ref.state2.absmax) and torch.equal(state.code, ref.code)


def test_fp8_rows_are_read_in_whole_scale_blocks(tmp_path: Path) -> None:
    """A row range of a block-scaled FP8 weight (dsft.models.shards._Rows: only the scale blocks under it read) equals
    those rows of the whole weight dequantized, at block edges, inside a block and over a partial last block."""
    import json

    from safetensors import safe_open

    from conftest import released_v3
    from dsft.models.fp8 import dequantize
    from dsft.models.shards import _Rows

    path = released_v3(tmp_path)
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    key = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"  # 40 rows over 32-row blocks: the last one partial
    with safe_open(str(path / index[key]), framework="pt", device="cpu") as handle:
        full = dequantize(handle.get_tensor(key), handle.get_tensor(key + "_scale_inv"), (32, 32))
        rows = _Rows(handle, key, (32, 32))
        assert full.shape[0] == 40
        for lo, hi in [(0, 40), (0, 20), (20, 40), (31, 33), (32, 40), (39, 40), (5, 5)]:
            assert torch.equal(rows(lo, hi), full[lo:hi]), (lo, hi)


def test_a_rank_continuing_an_adapter_reads_only_its_experts_rows(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """`dpo.init_adapter` under expert parallelism: each rank loads the base holding only its experts and the adapter's
    expert LoRA as only the rows of those experts (safetensors slices of the saved tensors, one row per chosen
    expert), into its block of padded slots; every other tensor whole. (The adapter's checks read every tensor
    once, one at a time, before: dsft.adapters.weights.) A synthetic adapter on an uneven subset (layer
    1: experts 0, 2, 3 all on rank 0; layer 2: 1, 3 on rank 0 and 7 on rank 1), continued as rank 0 and as rank 1."""
    import safetensors
    from safetensors.torch import load_file

    from dsft.adapters.lora import attach_lora, load_lora
    from dsft.adapters.metadata import build_metadata, write_metadata
    from dsft.config.schema import AdapterSection
    from dsft.models import stream
    from dsft.models.identity import model_identity
    from dsft.models.load import resolve_model_path
    from dsft.moe.lora import ExpertLoraLayer

    path = resolve_model_path("builtin:tiny-deepseek-v3")
    selection = {1: [0, 2, 3], 2: [1, 3, 7]}
    spec = AdapterSection(r=4, alpha=8, routed_experts=selection)
    model, targets = attach_lora(stream.load_streaming(path, torch.float32, True, torch.device("cpu")), spec, selection)
    torch.manual_seed(0)
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    model.save_pretrained(tmp_path / "adapter")
    write_metadata(tmp_path / "adapter", build_metadata(model, spec, targets,
                                                                  model_identity(path, "builtin:tiny-deepseek-v3")))
    saved = load_file(tmp_path / "adapter/adapter_model.safetensors")

    sliced: dict[str, object] = {}
    original = safetensors.safe_open

    class Counting:  # safe_open, recording which rows of each tensor were read
        def __init__(self, *args, **kwargs) -> None:
            self.inner = original(*args, **kwargs)

        def __enter__(self):  # noqa: ANN204
            self.handle = self.inner.__enter__()
            return self

        def __exit__(self, *exc) -> None:  # noqa: ANN002
            self.inner.__exit__(*exc)

        def keys(self):  # noqa: ANN202
            return self.handle.keys()

        def get_tensor(self, key: str):  # noqa: ANN202
            sliced.setdefault(key, []).append("whole")
            return self.handle.get_tensor(key)

        def get_slice(self, key: str):  # noqa: ANN202
            part = self.handle.get_slice(key)

            class Rows:
                def __getitem__(_, rows: slice):  # noqa: ANN202, N805
                    sliced.setdefault(key, []).append((rows.start, rows.stop))
                    return part[rows]

                def __getattr__(_, name: str):  # noqa: ANN202, N805
                    return getattr(part, name)
            return Rows()

    monkeypatch.setattr(safetensors, "safe_open", Counting)
    for rank, own in ((0, {1: (0, 3), 2: (0, 2)}), (1, {1: (0, 0), 2: (2, 3)})):
        sliced.clear()
        half = stream.load_streaming(path, torch.float32, True, torch.device("cpu"), expert_part=(rank, 2))
        continued = load_lora(half, str(tmp_path / "adapter"), is_trainable=True)
        layers = {n: m for n, m in continued.named_modules() if isinstance(m, ExpertLoraLayer)}
        assert len(layers) == 2
        for name, layer in layers.items():
            layer_id = int(name.split("layers.")[1].split(".")[0])
            for tensor in ("lora_gate_up_A", "lora_gate_up_B", "lora_down_A", "lora_down_B"):
                key = f"{name}.{tensor}.weight"
                # read into the model as only this rank's experts' rows (none of layer 1's on rank 1), after the
                # adapter's checks read it whole once in this process (one tensor at a time, held only while checked)
                assert sliced[key] == (["whole"] if rank == 0 else []) + [own[layer_id]], (rank, key)
                first, stop = own[layer_id]
                weight = getattr(layer, tensor)["default"].weight
                # slots a rank: the most experts any rank holds of the layer (layer 1: 3 and 0; layer 2: 2 and 1)
                assert weight.shape[0] == {1: 3, 2: 2}[layer_id] and weight.requires_grad
                assert torch.equal(weight[:stop - first], saved[key][first:stop])
                assert not weight[stop - first:].any()  # padding
        assert all(set(v) == {"whole"} for k, v in sliced.items() if ".experts.lora_" not in k)
