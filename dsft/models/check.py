"""A checkpoint's safetensors headers against the model its config.json builds, before any weight is read.

The model is built on the meta device with transformers' own class (no memory), and every tensor the
headers name is matched to it as dsft's loader would (dsft.models.stream: per-expert and fused expert
keys, Mixtral's older names, FP8 weights with their block scales, layers past num_hidden_layers such as
DeepSeek-V3's MTP layer skipped). A tensor of the wrong shape, an integer tensor where the model has
a floating-point weight, a missing or an unknown tensor: one line, before training starts rather than
minutes into it.
"""

from __future__ import annotations

from pathlib import Path

from dsft.models.files import safetensors_header, shard_names
from dsft.errors import DsftError
from dsft.arch import canonical
from dsft.arch import FUSED, LAYER, PER_EXPERT
from dsft.models.stream import SCALE_SUFFIX

FLOATS = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")
FP8 = ("F8_E4M3", "F8_E5M2")


def _expected(path: Path) -> tuple[dict[str, tuple[list[int], bool]], dict[str, tuple[int, int, int]], int,
                                   tuple[int, int] | None]:
    """(tensor name -> (shape, floating)) for every weight the checkpoint must hold, the fused expert
    modules (name -> (experts, intermediate, hidden)), the number of layers, and the FP8 block."""
    import torch

    from dsft.models.stream import StreamLoader

    loader = StreamLoader(path, torch.float32, False, torch.device("cpu"), "eager")
    model = loader.skeleton()
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()  # a tied checkpoint stores the embedding once, under its own name
    persistent = set(model.state_dict())
    expected: dict[str, tuple[list[int], bool]] = {}
    experts: dict[str, tuple[int, int, int]] = {}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if name not in persistent:
            continue
        module, _, leaf = name.rpartition(".")
        if leaf in ("gate_up_proj", "down_proj") and module.endswith(".mlp.experts"):
            e, two_i, h = model.get_submodule(module).gate_up_proj.shape
            experts[module] = (int(e), int(two_i) // 2, int(h))
            continue
        expected[name] = (list(tensor.shape), tensor.is_floating_point())
    return expected, experts, loader.num_layers, loader.fp8_block


def _problems(path: Path) -> list[str]:
    expected, experts, num_layers, block = _expected(path)
    tied = "lm_head.weight" not in expected
    seen: set[str] = set()
    expert_parts: dict[str, set[tuple[int | None, str]]] = {m: set() for m in experts}
    problems: list[str] = []
    unknown: list[str] = []
    for shard in shard_names(path):
        header, _ = safetensors_header(path / shard)
        for key, entry in header.items():
            if key == "__metadata__" or key.endswith(SCALE_SUFFIX):
                continue
            layer = LAYER.search(key)
            if layer and int(layer.group(1)) >= num_layers:  # DeepSeek-V3's MTP layer: not loaded
                continue
            name, dtype, shape = canonical(key), entry["dtype"], list(entry["shape"])
            where = f"{path / shard}: {key}"
            if dtype in FP8:
                scale = header.get(key + SCALE_SUFFIX)
                if block is None or scale is None:  # no scale: its shape is not checked either
                    problems.append(f"{where} is FP8 without a {key}{SCALE_SUFFIX} block scale in the same shard")
                    continue
                problems += _grid_problem(where, scale, shape, block)
            m = PER_EXPERT.match(name) or FUSED.match(name)
            if m and m.group("module") in experts:
                want = _expert_shape(m, experts[m.group("module")], expert_parts[m.group("module")])
                if isinstance(want, str):
                    problems.append(f"{where}: {want}")
                    continue
                floating = True
            elif name in expected:
                want, floating = expected[name]
                seen.add(name)
            elif name == "lm_head.weight" and "model.embed_tokens.weight" in expected and tied:
                want, floating = expected["model.embed_tokens.weight"]  # a tied copy some releases store too
            else:
                unknown.append(key)
                continue
            if shape != want:
                problems.append(f"{where} is {shape}, config.json implies {want}")
            elif floating and dtype not in FLOATS:
                problems.append(f"{where} is stored as {dtype}, config.json implies a floating-point weight")
    missing = [n for n in expected if n not in seen]
    for module, (e, _, _) in experts.items():
        lacking = [(i, p) for i in range(e) for p in ("gate_proj", "up_proj", "down_proj")
                   if (i, p) not in expert_parts[module]]
        if lacking:
            missing.append(f"{module}.{lacking[0][0]}.{lacking[0][1]}.weight")
    if missing:
        problems.append(f"{path}: no tensor {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if unknown:
        problems.append(f"{path}: tensor {unknown[0]} is not part of this model" +
                        (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""))
    return problems


def _grid_problem(where: str, scale: dict, shape: list[int], block) -> list[str]:
    """An FP8 tensor's block scale on the grid its shape and the block size give (partial edge blocks included)."""
    grid = [-(-shape[0] // block[0]), -(-shape[1] // block[1])] if len(shape) == 2 else None
    if list(scale["shape"]) != grid:
        return [f"{where}: its block scale is {scale['shape']}, {shape} in {block} blocks needs {grid}"]
    return []


def _expert_shape(m, layer: tuple[int, int, int], parts: set[tuple[int | None, str]]) -> list[int] | str:
    """The shape config.json implies for a per-expert or fused expert tensor (recording which experts' parts it
    holds), or what is wrong with its expert index."""
    e, inter, hidden = layer
    proj = m.group("proj")
    want = {"gate_proj": [inter, hidden], "up_proj": [inter, hidden], "down_proj": [hidden, inter],
            "gate_up_proj": [e, 2 * inter, hidden]}[proj]
    if "expert" in m.groupdict():
        index = int(m.group("expert"))
        if index >= e:
            return f"expert {index}, but config.json gives {e} experts per layer"
        parts.add((index, proj))
        return want
    parts.update((i, p) for i in range(e) for p in (("gate_proj", "up_proj") if proj == "gate_up_proj" else ("down_proj",)))
    return [e, hidden, inter] if proj == "down_proj" else want


def check_checkpoint(path: Path, key: str = "model.path") -> None:
    """Every shard's header against the model config.json builds; one line naming the first problem."""
    try:
        problems = _problems(path)
    except ValueError as e:  # a header that does not parse (dsft.models.files)
        raise DsftError(f"{key}: {e}") from None
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise DsftError(f"{key}: {problems[0]}{more}; the weights do not match config.json: re-download the "
                        "checkpoint or fix config.json")
