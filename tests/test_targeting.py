"""Expert-aware targeting: routing profiles, policies, plans, trainable routers, full expert training."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsft.adapters.selection import select_by_policy
from dsft.config.schema import AdapterSection, ModelSection, RoutedExperts
from dsft.models.load import load_model, resolve_model_path
from dsft.moe import profile as rp
from dsft.moe.balance import balance_term
from dsft.moe.routing import routers

FAVOURED = {1: [5, 6], 2: [4, 6]}  # the experts a biased tiny V3 sends every token to


def _load(path: Path | str = "builtin:tiny-deepseek-v3"):
    section = ModelSection(path=str(path), dtype="float32")
    return load_model(section, resolve_model_path(section.path))


@pytest.fixture
def biased_v3(tmp_path: Path) -> Path:
    """The tiny V3 with correction biases that make FAVOURED the top-2 of every token."""
    src, dst = resolve_model_path("builtin:tiny-deepseek-v3"), tmp_path / "biased-v3"
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    for layer, experts in FAVOURED.items():
        bias = torch.zeros(8)
        bias[experts] = 10.0
        tensors[f"model.layers.{layer}.mlp.gate.e_score_correction_bias"] = bias
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def _tokens(rows: list[list[int]], loss_from: int = 0) -> dict[str, list[list[int]]]:
    return {"input_ids": rows, "labels": [[-100] * loss_from + r[loss_from:] for r in rows]}


def test_profile_matches_hand_computation_on_three_tokens() -> None:
    model = _load("builtin:tiny-deepseek-v2")
    captured = {}
    router = routers(model)[1]
    def keep_input(module, args, output) -> None:
        captured["h"] = args[0].detach().reshape(-1, 64)

    handle = router.register_forward_hook(keep_input)
    stats = rp.collect(model, _tokens([[5, 17, 42]]), all_tokens=True, progress=False)
    handle.remove()
    scores = (captured["h"].float() @ router.weight.float().T).softmax(-1)  # V2: softmax, greedy top-2
    weights, index = scores.topk(2, dim=-1)
    counts, gate = torch.zeros(8), torch.zeros(8)
    for t in range(3):
        for k in range(2):
            counts[index[t, k]] += 1
            gate[index[t, k]] += weights[t, k]
    assert stats[1].tokens == 3
    assert stats[1].counts.tolist() == counts.tolist()
    torch.testing.assert_close(stats[1].gate_sum.float(), gate, rtol=0, atol=1e-6)


def test_profile_ranks_the_favoured_experts_and_top_p_picks_them(biased_v3: Path) -> None:
    model = _load(biased_v3)
    rows = [[i % 900 + 3 for i in range(s, s + 12)] for s in range(0, 120, 12)]
    profile = rp.summarize(rp.collect(model, _tokens(rows), progress=False), top_k=2, meta={})
    for layer, experts in FAVOURED.items():
        d = profile["layers"][str(layer)]
        ranked = sorted(range(8), key=lambda e: -d["token_share"][e])
        assert sorted(ranked[:2]) == experts and all(d["token_share"][e] == 1.0 for e in experts)
    for policy in ("gate_score", "token_share"):
        spec = RoutedExperts(policy=policy, top_p=1.0)
        assert select_by_policy(spec, profile) == FAVOURED


def test_profile_sums_and_padding(tmp_path: Path) -> None:
    model = _load()
    rows = [[3, 4, 5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16, 17]]
    loss_only = rp.collect(model, _tokens(rows, loss_from=1), batch_size=3, progress=False)
    assert loss_only[1].tokens == sum(len(r) - 1 for r in rows)
    padded = rp.collect(model, _tokens(rows), batch_size=3, all_tokens=True, progress=False)
    one_by_one = rp.collect(model, _tokens(rows), batch_size=1, all_tokens=True, progress=False)
    profile = rp.summarize(padded, top_k=2, meta={"tokens_counted": 15})
    for layer, s in padded.items():
        assert s.tokens == 15 and s.counts.sum() == 15 * 2
        assert s.counts.tolist() == one_by_one[layer].counts.tolist()
        torch.testing.assert_close(s.gate_sum, one_by_one[layer].gate_sum, rtol=1e-5, atol=1e-6)
        assert sum(profile["layers"][str(layer)]["token_share"]) == pytest.approx(2.0)
    rp.write_profile(tmp_path / "routing", profile)
    assert {p.name for p in (tmp_path / "routing").iterdir()} == {"profile.json", "profile.csv", "heatmap.png"}
    assert len((tmp_path / "routing/profile.csv").read_text().splitlines()) == 1 + 2 * 8


def test_policy_clamps_and_refuses_empty() -> None:
    from dsft.errors import DsftError

    profile = {"layers": {"1": {"gate_sum": [0.5, 0.3, 0.2, 0.0], "counts": [1, 1, 1, 1]},
                          "2": {"gate_sum": [0.0] * 4, "counts": [0] * 4}}}
    assert select_by_policy(RoutedExperts(policy="gate_score", top_p=0.7), profile) == {1: [0, 1], 2: [0]}
    assert select_by_policy(RoutedExperts(policy="gate_score", top_p=1.0, max_per_layer=1, min_per_layer=0),
                            profile) == {1: [0]}
    with pytest.raises(DsftError, match="selected no expert"):
        select_by_policy(RoutedExperts(policy="gate_score", top_p=0.5, min_per_layer=0),
                         {"layers": {"1": {"gate_sum": [0.0] * 4, "counts": [0] * 4}}})


@pytest.mark.parametrize("value, message", [
    ({"policy": "gate_score", "top_p": 0}, "adapter.routed_experts.top_p: must be > 0"),
    ({"policy": "gate_score", "top_p": 1.5}, "adapter.routed_experts.top_p: must be <= 1"),
    ({"policy": "magic"}, "adapter.routed_experts.policy: must be one of"),
    ({"policy": "token_share", "experts": "all"}, "give either experts or policy"),
    ({"policy": "token_share", "min_per_layer": 3, "max_per_layer": 2}, "max_per_layer (2) must be >= min_per_layer"),
])
def test_bad_policy_is_a_recipe_error(value, message: str, make_recipe, cli) -> None:
    result = cli("validate", make_recipe(adapter={"routed_experts": value}))
    assert result.exit_code == 2 and message in result.output, result.output


def test_balance_loss_needs_trainable_router(make_recipe, cli) -> None:
    result = cli("validate", make_recipe(training={"balance_loss": True}))
    assert result.exit_code == 2 and "training.balance_loss needs adapter.router: trainable" in result.output


def test_sft_with_gate_score_policy_adapts_exactly_the_planned_experts(biased_v3: Path, make_recipe, cli,
                                                                       tmp_path: Path) -> None:
    recipe = make_recipe(model={"path": str(biased_v3)}, training={"max_steps": 4},
                         adapter={"routed_experts": {"policy": "gate_score", "top_p": 1.0, "samples": 8}})
    result = cli("sft", "--recipe", recipe)
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    plan = json.loads((run / "plan.json").read_text())
    assert plan["groups"]["routed_experts"]["experts"] == {str(k): v for k, v in FAVOURED.items()}
    meta = json.loads((run / "adapter/dsft_adapter.json").read_text())
    assert meta["routed_experts"]["experts"] == plan["groups"]["routed_experts"]["experts"]
    weights = load_file(run / "adapter/adapter_model.safetensors")
    for layer in (1, 2):
        b = weights[f"base_model.model.model.layers.{layer}.mlp.experts.lora_down_B.weight"]
        assert b.shape[0] == 2 and (b.abs().sum(dim=(1, 2)) > 0).all()  # both planned experts were trained
    assert sum(t.numel() for t in weights.values()) == plan["trainable_params"]
    for name in ("routing/profile.json", "routing/heatmap.png", "routing/after/profile.json", "routing/heatmap_diff.png"):
        assert (run / name).is_file(), name
    assert "routing change after training" in result.output


def test_profiling_a_mix_counts_repeated_rows_once_says_its_time_and_can_skip_the_second_pass(make_recipe, cli,
                                                                                                 tmp_path: Path) -> None:
    """A mix of 16 rows whose second file's 2 rows are repeated 4 times (`rows: 8`): the profile samples the 10
    distinct rows, not 16 (samples: 1000); the plan prints its rows and seconds; profile_after: false skips the
    profile after training."""
    from conftest import legal_rows, write_jsonl

    a = write_jsonl(tmp_path / "a.jsonl", legal_rows(8))
    b = write_jsonl(tmp_path / "b.jsonl", legal_rows(10)[8:])
    recipe = make_recipe(data={"train": [{"path": str(a), "weight": 4}, {"path": str(b), "rows": 8}]},
                         training={"max_steps": 1},
                         adapter={"routed_experts": {"policy": "token_share", "top_p": 0.3, "profile_after": False}})
    result = cli("sft", "--recipe", recipe)
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    plan = json.loads((run / "plan.json").read_text())
    assert plan["profile"]["rows"] == 10 and plan["profile"]["unique_rows"] == 10 and plan["profile"]["seconds"] > 0
    assert json.loads((run / "routing/profile.json").read_text())["rows"] == 10
    assert "10 rows sampled (10 distinct in data.train)" in result.output
    assert not (run / "routing/after").exists() and "routing change after training" not in result.output


def test_experts_commands_then_sft_reuses_the_profile(make_recipe, cli, tmp_path: Path) -> None:
    recipe = make_recipe(adapter={"routed_experts": {"policy": "token_share", "top_p": 0.3, "samples": 8}},
                         training={"max_steps": 2})
    first = cli("experts", "profile", "--recipe", recipe, "--samples", 8)
    assert first.exit_code == 0 and "written" in first.output, first.output
    assert "cached" in cli("experts", "profile", "--recipe", recipe, "--samples", 8).output
    plan = cli("experts", "plan", "--recipe", recipe)
    assert plan.exit_code == 0 and "dsft targeting plan" in plan.output
    key = json.loads((tmp_path / "run/routing/profile.json").read_text())["key"]
    result = cli("sft", "--recipe", recipe)
    assert result.exit_code == 0, result.output
    assert "profiling routing" not in result.output.split("dsft targeting plan")[0]
    assert json.loads((tmp_path / "run/routing/profile.json").read_text())["key"] == key


def test_trainable_router_and_balance_loss(make_recipe, cli, tmp_path: Path) -> None:
    recipe = make_recipe(adapter={"router": "trainable", "attention": False},
                         training={"balance_loss": True, "balance_loss_alpha": 0.1, "max_steps": 4})
    result = cli("sft", "--recipe", recipe)
    assert result.exit_code == 0, result.output
    weights = load_file(tmp_path / "run/adapter/adapter_model.safetensors")
    router = [k for k in weights if k.endswith("mlp.gate.weight")]
    assert len(router) == 2
    base = _load()
    for key in router:
        gate = base.model.layers[int(key.split("layers.")[1].split(".")[0])].mlp.gate
        assert not torch.equal(weights[key], gate.weight)
        assert torch.equal(weights[key.replace("weight", "e_score_correction_bias")], gate.e_score_correction_bias)
    logs = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert any(r.get("balance_loss", 0) > 0 for r in logs)


def test_balance_term_matches_the_papers_formula() -> None:
    logits = torch.tensor([[2.0, 0.0, -1.0, 0.5], [0.1, 0.2, 0.3, 0.4], [1.0, 1.0, -2.0, 0.0]])
    index = logits.topk(2, dim=-1).indices
    mask = torch.tensor([1, 1, 0])
    s = logits[:2].softmax(-1)
    f = torch.zeros(4)
    for t in range(2):
        f[index[t]] += 1
    expected = (4 / (2 * 2) * f * s.mean(0)).sum()
    torch.testing.assert_close(balance_term(logits, index, mask, 1, sequence_wise=False), expected)


def test_full_mode_trains_only_the_selected_experts_whole(tmp_path: Path) -> None:
    from dsft.adapters.lora import attach_lora

    adapter = AdapterSection(attention=False, shared_experts=False, dense_mlp=False,
                             routed_experts={"experts": {1: [0, 3]}, "mode": "full"})
    model = _load()
    ids = torch.randint(3, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
    peft_model, _ = attach_lora(model, adapter, {1: [0, 3]})
    layer = peft_model.base_model.model.model.layers[1].mlp.experts
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, before)  # starts as the base
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert sorted(n.split("experts.")[1] for n in trainable) == ["lora_full_down.default.weight", "lora_full_gate_up.default.weight"]
    start = {n: p.detach().clone() for n, p in trainable.items()}
    optimizer = torch.optim.SGD(trainable.values(), lr=1.0)
    peft_model(ids, labels=ids).loss.backward()
    optimizer.step()
    for n, p in trainable.items():
        assert not torch.equal(p, start[n])
    x = torch.randn(10, 64)
    other = torch.tensor([[1, 2]] * 10)
    with torch.no_grad():
        torch.testing.assert_close(layer(x, other, torch.ones(10, 2)), layer.get_base_layer()(x, other, torch.ones(10, 2)))
        new = layer.lora_full_gate_up["default"].weight[1]
        torch.testing.assert_close(layer(x, torch.tensor([[3, 1]] * 10), torch.tensor([[1.0, 0.0]] * 10)),
                                   _expert(x, new, layer.lora_full_down["default"].weight[1], layer.get_base_layer().act_fn))


def _expert(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, act) -> torch.Tensor:
    gate, up = (x @ gate_up.T).chunk(2, dim=-1)
    return (act(gate) * up) @ down.T


def test_the_memory_estimate_never_holds_the_rest_whole_under_training_parallel() -> None:
    """Under training.parallel each rank reads only its shard of the weights outside the experts, a routing policy's
    profile included (it runs on a companion holding the same shards), so the peak is the training footprint with 1/N
    of them, with or without a policy (one micro-batch of 8 tokens: activations negligible)."""
    from dsft.adapters.plan import CUDA_CONTEXT_GIB, memory_estimate
    from dsft.config.schema import Recipe

    cfg = json.loads((resolve_model_path("builtin:tiny-deepseek-v3") / "config.json").read_text())

    def peak(routed: object, parallel: dict | None) -> dict:
        recipe = Recipe.model_validate({
            "model": {"path": "builtin:tiny-deepseek-v3", "quantization": "nf4"},
            "data": {"train": "t.jsonl", "max_length": 8}, "adapter": {"routed_experts": routed},
            "training": {"micro_batch_size": 1, "parallel": parallel}, "output_dir": "out"})
        return memory_estimate(recipe, cfg, trainable=1000, processes=2)

    named, policy = peak({1: [0], 2: [1]}, {"ep": 2}), peak({"policy": "token_share"}, {"ep": 2})
    assert named == policy
    assert named["peak_gib"] == pytest.approx(named["weights_gib"] + named["adapter_training_gib"]
                                              + named["activations_gib"] + CUDA_CONTEXT_GIB)
    whole = peak({1: [0], 2: [1]}, None)  # DDP: every process holds the model
    assert whole["weights_gib"] > named["weights_gib"] * 1.9
