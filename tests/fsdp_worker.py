"""One rank of tests/test_distributed.py's expert-parallel cases (run after the dsft commands of the shared launch,
over gloo, by tests/launch.py): dsft's experts with expert LoRA under expert parallelism and FSDP2 on transformers'
engine (dsft.moe.parallel), against one unsharded process."""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from dsft.adapters.lora import attach_lora
from dsft.config.schema import AdapterSection, ModelSection
from dsft.models.load import load_model, resolve_model_path
from dsft.moe.experts import DsftExperts, expert_modules, layer_of
from dsft.train.dist import full_trainable_state


# the held cases besides ep-subset-held: (quantization, fused layout, LoRA on SUBSET)
HELD = [("none", False, False), ("none", False, True), ("none", True, False), ("nf4", True, False), ("nf4", True, True)]
# LoRA on some of a layer's 8 experts, in padded slots under ep 2: layer 1's sit 3 on rank 0 and 1 on rank 1, layer 2's
# both on rank 0 (rank 1 holds only padding)
SUBSET = {1: [0, 1, 2, 5], 2: [1, 3]}


def build(path: str = "builtin:tiny-deepseek-v3", quantization: str = "nf4", expert_parallel: int = 1,
          subset: bool = False, rest_later: bool = False) -> nn.Module:
    section = ModelSection(path=path, dtype="float32", quantization=quantization)
    base = load_model(section, resolve_model_path(section.path), expert_parallel=expert_parallel, rest_later=rest_later)
    selection = {layer_of(n): SUBSET[layer_of(n)] if subset else None for n in expert_modules(base)}
    routed = {layer: ids for layer, ids in selection.items()} if subset else "all"
    model = attach_lora(base, AdapterSection(r=4, alpha=8, routed_experts=routed), selection)[0]
    torch.manual_seed(0)
    for p in model.parameters():
        if p.requires_grad:
            nn.init.normal_(p, std=0.05)
    return model


def step(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.optim.Optimizer]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    logits = model(input_ids=ids).logits
    loss = logits.float().pow(2).mean()
    loss.backward()
    opt.step()
    return logits.detach(), opt


def _route_to_the_first_experts(model: nn.Module) -> None:
    """Every token to experts 0-3 (rank 0's under EP over two ranks): rank 1's experts get empty batches."""
    for name, buffer in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buffer[:4] = 10.0


class CountingOpen:
    """safetensors.safe_open counting the bytes each key's reads return (get_tensor, and a get_slice's rows)."""

    def __init__(self, original) -> None:
        self.original, self.bytes = original, {}

    def __call__(self, *args, **kwargs):
        counter, handle = self, self.original(*args, **kwargs)

        class Slice:
            def __init__(self, key: str) -> None:
                self.key, self.part = key, handle.get_slice(key)

            def __getattr__(self, name):
                return getattr(self.part, name)

            def __getitem__(self, index):
                return counter.count(self.key, self.part[index])

        class Handle:
            def __enter__(self):
                handle.__enter__()
                return self

            def __exit__(self, *exc):
                return handle.__exit__(*exc)

            def __getattr__(self, name):
                return getattr(handle, name)

            def get_tensor(self, key: str):
                return counter.count(key, handle.get_tensor(key))

            def get_slice(self, key: str):
                return Slice(key)

        return Handle()

    def count(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        self.bytes[key] = self.bytes.get(key, 0) + tensor.numel() * tensor.element_size()
        return tensor


def checkpoint_bytes(path: str = "builtin:tiny-deepseek-v3") -> dict[str, int]:
    """Every tensor's bytes in the checkpoint."""
    from safetensors import safe_open

    from dsft.models.stream import shard_files

    sizes = {}
    for shard in shard_files(resolve_model_path(path)):
        with safe_open(str(shard), framework="pt", device="cpu") as handle:
            for key in handle.keys():
                part = handle.get_slice(key)
                sizes[key] = torch.empty(part.get_shape(), dtype=_DTYPES[part.get_dtype()], device="meta").nbytes
    return sizes


_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F8_E4M3": torch.float8_e4m3fn,
           "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8}


def _held_rows_read(ep: int, whole: nn.Module, subset: bool, quantization: str,
                    path: str) -> tuple[nn.Module, CountingOpen]:
    """The model loaded as training.parallel loads it (load_model's expert_parallel: holding only this rank's experts;
    rest_later: every other weight a placeholder until read_rest), its trainable weights then set to the rows of
    `whole`'s (which `build` initialised whole) its slots hold; and the counter of what it read from the checkpoint
    (read_rest's reads counted too: the counter stays installed until ep_case is done)."""
    import safetensors

    from dsft.moe.lora import ExpertLoraLayer, pad, padded_rows

    counter = safetensors.safe_open = CountingOpen(safetensors.safe_open)
    model = build(path, quantization, expert_parallel=ep, subset=subset, rest_later=True)
    whole, slotted = dict(whole.named_parameters()), padded_rows(model)
    rank = next(m.first_expert // m.num_experts for m in model.modules() if isinstance(m, DsftExperts))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                full = pad(whole[name], slotted[name]) if name in slotted else whole[name]
                p.copy_(full[rank * p.shape[0]:(rank + 1) * p.shape[0]] if name in slotted else full)
    assert all(m.slots for m in model.modules() if isinstance(m, ExpertLoraLayer))
    return model, counter


def _same_nf4_linears(model: nn.Module, reference: nn.Module) -> bool:
    """Every NF4 Linear4bit outside the experts: codes (gathered) and quantization state bit-equal to `reference`'s."""
    import bitsandbytes as bnb

    theirs = dict(reference.named_modules())
    same = []
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            mine, ref = module.quant_state, theirs[name].weight.quant_state
            codes = module.weight.full_tensor() if isinstance(module.weight, DTensor) else module.weight.data
            same.append(torch.equal(codes, theirs[name].weight.data) and mine.shape == ref.shape and mine.dtype == ref.dtype
                        and all(torch.equal(a, b) for a, b in ((mine.absmax, ref.absmax), (mine.offset, ref.offset),
                                                                 (mine.code, ref.code), (mine.state2.absmax, ref.state2.absmax),
                                                                 (mine.state2.code, ref.state2.code))))
    return bool(same) and all(same)


def ep_case(quantization: str, rank: int, world: int, one_rank: bool = False, held: bool = False,
            subset: bool = False, path: str = "builtin:tiny-deepseek-v3", ep: int | None = None) -> dict:
    """Expert parallelism over the two ranks and FSDP2 (dsft.moe.parallel.parallelize, fsdp 2 x ep 2), LoRA on every
    routed expert (`subset`: on SUBSET, in padded slots), against one unsharded process at the same global batch:
    logits, gradients and one AdamW step. `held`: the model loaded holding only this rank's experts (the keys it read
    reported)."""
    from dsft.moe.lora import padded_rows, unpad
    from dsft.models.shards import read_rest, to_meta
    from dsft.moe.parallel import local_fraction, parallelize, unsharded_trainable

    ep = ep or world
    ids = torch.randint(0, 100, (2 * world, 16), generator=torch.Generator().manual_seed(2))
    reference = build(quantization=quantization, subset=subset, path=path)
    model, counter = (_held_rows_read(ep, reference, subset, quantization, path) if held
                      else (build(quantization=quantization, subset=subset, path=path), None))
    if one_rank:
        _route_to_the_first_experts(reference)
        _route_to_the_first_experts(model)
    ref_logits, _ = step(reference, ids)  # its gradients stay in .grad
    ref_grads = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    expected = {n: p.detach() for n, p in reference.named_parameters() if p.requires_grad}
    whole_codes = {n: p.detach().clone() for n, p in reference.named_parameters() if n.endswith(".codes")}

    to_meta(model)
    parallelize(model, fsdp=world, ep=ep)
    read_rest(model)
    if counter is not None:
        import safetensors

        safetensors.safe_open = counter.original
    mine = slice(2 * rank, 2 * rank + 2)
    logits, opt = step(model, ids[mine])
    lora = [p for n, p in model.named_parameters() if "experts.lora_" in n]
    states = [t for p in lora for t in opt.state[p].values() if t.dim()]  # AdamW's exp_avg, exp_avg_sq
    grads = {n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad)
             for n, p in model.named_parameters() if p.requires_grad}
    slotted = padded_rows(model)
    padding = [g[[i for i in range(g.shape[0]) if i not in slotted[n][0]]] for n, g in grads.items() if n in slotted]
    grads = {n: unpad(g, slotted[n]) if n in slotted else g for n, g in grads.items()}
    experts = [m for m in model.modules() if isinstance(m, DsftExperts)]
    rows = [(n, p) for n, p in model.named_parameters() if n.endswith(".codes")]
    gathered = full_trainable_state(model)
    return {
        "logits_max_diff": float((logits - ref_logits[mine]).abs().max()),
        "grad_max_rel": max(float((grads[n] - g).abs().max() / g.abs().max().clamp_min(1e-12)) for n, g in ref_grads.items()),
        "experts_with_grad": sorted({(SUBSET[layer_of(n)] if subset else range(8))[e] for n, g in grads.items()
                                     if "experts.lora_" in n for e in g.flatten(1).abs().sum(1).nonzero().flatten().tolist()}),
        "padding_rows": sorted({t.shape[0] for t in padding}),  # per expert LoRA tensor
        "experts_with_grad_by_layer": {layer: sorted({SUBSET[layer][e] if subset else e for n, g in grads.items()
                                                      if "experts.lora_" in n and layer_of(n) == layer
                                                      for e in g.flatten(1).abs().sum(1).nonzero().flatten().tolist()})
                                       for layer in SUBSET},
        "padding_grad": max((float(t.abs().max()) for t in padding if t.numel()), default=0.0),
        "saved_shapes_equal": all(gathered[n].shape == expected[n].shape for n in expected),
        "param_max_diff": max(float((gathered[n] - expected[n]).abs().max()) for n in expected),
        "local_fraction": local_fraction(model),
        "optimizer_local_fraction": sum(t.to_local().numel() for t in states) / sum(t.numel() for t in states),
        "local_experts": sorted({m.num_experts for m in experts}),
        "unsharded_trainable": unsharded_trainable(model),
        "codes_equal_one_process": all(torch.equal(p.full_tensor(), whole_codes[n]) for n, p in rows),
        "expert_lora_params": sum("experts.lora_" in n for n in gathered),
        **(_reads(counter, world, path) if counter is not None else {}),
        **({"rest_nf4_equal_one_process": _same_nf4_linears(model, reference)} if quantization == "nf4" else {}),
    }


def _reads(counter: CountingOpen, world: int, path: str) -> dict:
    """What a rank read: the experts whose tensors it opened (per-expert layout) and the experts' bytes; of the rest
    (every tensor outside the routed experts), its bytes against the whole's and the largest tensor's."""
    sizes = checkpoint_bytes(path)
    rest = {k: n for k, n in sizes.items() if ".experts." not in k}
    return {"experts_read": sorted({int(k.split(".experts.")[1].split(".")[0]) for k in counter.bytes
                                    if ".experts." in k and k.split(".experts.")[1].split(".")[0].isdigit()}),
            "expert_bytes_read": sum(n for k, n in counter.bytes.items() if ".experts." in k),
            "expert_bytes": sum(n for k, n in sizes.items() if ".experts." in k),
            "rest_bytes_read": sum(n for k, n in counter.bytes.items() if k in rest),
            "rest_bytes": sum(rest.values()), "rest_largest": max(rest.values()),
            "rest_tensors_read": len([k for k in counter.bytes if k in rest]), "rest_tensors": len(rest)}


def profile_case(rank: int, world: int) -> dict:
    """A routing profile under training.parallel (ep = world), as a policy runs it: on a companion of the base
    (dsft.train.pipeline.sharded_companion: the base's held experts shared, the rest read as this rank's FSDP2
    shards), each rank its share of the rows with the tokens dispatched to the experts' ranks, the counts summed;
    against one process profiling every row on the whole model. Reports the bytes of the rest the companion read
    and whether the base's rest stayed placeholders."""
    from dsft.models.shards import pending
    from dsft.moe import profile as routing_profile
    from dsft.moe.parallel import dispatched
    from dsft.train.pipeline import sharded_companion
    from dsft.train.targeting import collect_shared

    section = ModelSection(path="builtin:tiny-deepseek-v3", dtype="float32", quantization="nf4")
    path = resolve_model_path(section.path)
    rows = torch.randint(3, 1000, (8, 12), generator=torch.Generator().manual_seed(5)).tolist()
    tokens = {"input_ids": rows, "labels": rows}
    one = routing_profile.collect(load_model(section, path), tokens, batch_size=2, progress=False)
    base = load_model(section, path, expert_parallel=world, rest_later=True)
    waiting = pending(base)
    import safetensors

    counter = safetensors.safe_open = CountingOpen(safetensors.safe_open)
    try:
        with dispatched(base, world), sharded_companion(section, path, base) as companion:
            stats = collect_shared(companion, tokens, "loss", 2, 0)  # each rank half the rows, counts summed
    finally:
        safetensors.safe_open = counter.original
    sizes = checkpoint_bytes()
    rest = {k: n for k, n in sizes.items() if ".experts." not in k}
    return {"counts_equal_one_process": all(torch.equal(stats[layer].counts, one[layer].counts) for layer in one),
            "layers": len(one), "base_rest_still_placeholders": pending(base) == waiting > 0,
            "expert_bytes_read": sum(n for k, n in counter.bytes.items() if ".experts." in k),
            "rest_bytes_read": sum(n for k, n in counter.bytes.items() if k in rest), "rest_bytes": sum(rest.values()),
            "rest_largest": max(rest.values())}


def main(out: str, fused: str) -> None:
    """Every case in one process group (one start-up): on the built-in model (saved in DeepSeek's per-expert layout)
    and on the same weights saved in transformers' fused layout (`fused`: tests/conftest.py fused_checkpoint)."""
    resolve_model_path("builtin:tiny-deepseek-v3")  # materialised before the process group: transformers saves on rank 0 only
    joined = dist.is_initialized()  # tests/launch.py: the dsft commands' process group
    if not joined:
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    report = {"ep-fp32-fused-subset": ep_case("none", rank, world, subset=True, path=fused),
              "ep-nf4-one-rank": ep_case("nf4", rank, world, one_rank=True),
              f"ep-subset-held-rank{rank}": ep_case("nf4", rank, world, held=True, subset=True)}
    report[f"profile-rank{rank}"] = profile_case(rank, world)
    # the rest of {fp32, NF4} x {per-expert, fused} x {LoRA on all experts, on SUBSET}, loaded as dsft loads them
    for quantization, fused_layout, subset in HELD:
        name = f"ep-{'nf4' if quantization == 'nf4' else 'fp32'}-{'fused' if fused_layout else 'per-expert'}-" \
               f"{'subset' if subset else 'all'}-held"
        report[name] = ep_case(quantization, rank, world, held=True, subset=subset,
                               path=fused if fused_layout else "builtin:tiny-deepseek-v3")
    if rank == 1:  # rank 1's reports, written beside rank 0's
        with open(out + ".rank1", "w") as f:
            json.dump({k: v for k, v in report.items() if k.endswith("-rank1")}, f)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(report, f)
    if not joined:
        dist.destroy_process_group()


def four(out: str) -> None:
    """Four processes (torchrun): fsdp 4 x ep 2, so each block of experts is held by two ranks and FSDP2 shards it
    between them (the expert-FSDP axis); NF4, LoRA on SUBSET, each rank loading only its block."""
    resolve_model_path("builtin:tiny-deepseek-v3")
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    report = {f"rank{rank}": ep_case("nf4", rank, world, held=True, subset=True, ep=2)}
    reports: list = [None] * world
    dist.all_gather_object(reports, report)
    if rank == 0:
        with open(out, "w") as f:
            json.dump({k: v for r in reports for k, v in r.items()}, f)
    dist.destroy_process_group()


def forked(out: str, world: int = 4) -> int:
    """`four` on `world` ranks forked from this process once it has imported the stack (torch, transformers, PEFT,
    bitsandbytes, dsft) and before it has run any tensor operation: each rank starts without importing it again
    (12 s of a core each), as torchrun's ranks would. Returns the number of ranks that failed."""
    import os
    import socket
    import traceback

    import bitsandbytes  # noqa: F401 - what the ranks import lazily, imported once here
    import peft  # noqa: F401
    import transformers.distributed.expert_parallel  # noqa: F401
    import transformers.distributed.fsdp  # noqa: F401

    import dsft.models.shards  # noqa: F401
    import dsft.moe.parallel  # noqa: F401

    resolve_model_path("builtin:tiny-deepseek-v3")  # built already (the suite's), else built before any fork
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    children = []
    for rank in range(world):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                                  MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
                torch.set_num_threads(1)
                four(out)
                code = 0
            except BaseException:  # noqa: BLE001 - a rank's failure is its exit status, its traceback on stderr
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        children.append(pid)
    return sum(os.waitpid(pid, 0)[1] != 0 for pid in children)


if __name__ == "__main__":
    if sys.argv[1] == "forked":
        sys.exit(forked(sys.argv[2]))
    four(sys.argv[2]) if sys.argv[1] == "four" else main(*sys.argv[1:])
