"""Where dsft leans on its stack's insides, in one place: the versions every line of dsft was checked on
(pyproject.toml pins below the next minor of each), and every private member of TRL, PEFT and
transformers that dsft overrides, reads or patches, with where. A version outside these is not refused
(pip's pins do that); a command that trains says so on the console once, because the FutureWarnings
that would announce a change go to run.log. `tests/test_compat.py` fails, naming the member, when an
installed version lacks one. No torch, no dsft imports: every layer may read it."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

# the minor versions dsft was tested on (2026-12: CPU here, CUDA on the lent H100)
TESTED: dict[str, str] = {
    "torch": "2.13", "transformers": "5.25", "peft": "0.21", "trl": "1.16", "bitsandbytes": "0.50",
    "accelerate": "1.16", "datasets": "5.2", "huggingface_hub": "2.4", "typer": "0.29", "pydantic": "2.14",
    "safetensors": "0.8", "math-verify": "0.9",
}


@dataclass(frozen=True)
class Private:
    """`owner.member` (a dotted path from an importable module), how dsft uses it, and where."""
    path: str
    use: str
    where: str

    def found(self) -> bool:
        module, _, attrs = self.path.partition(":")
        try:
            target: object = importlib.import_module(module)
        except ImportError:
            return False
        for name in attrs.split("."):
            if not hasattr(target, name):
                return False
            target = getattr(target, name)
        return True


PRIVATE: tuple[Private, ...] = (
    Private("trl:DPOTrainer._prepare_dataset", "overridden: dsft's tokenized pairs pass through", "dsft/train/trainer.py"),
    Private("trl:KTOTrainer._prepare_dataset", "overridden: dsft's tokenized rows pass through", "dsft/train/trainer.py"),
    Private("trl:DPOTrainer._load_from_checkpoint", "overridden: FSDP2 resume from the adapter file",
            "dsft/train/trainer.py"),
    Private("trl:GRPOTrainer._generate", "wrapped (generation time and tokens); called by the reward preflight",
            "dsft/train/trainer.py"),
    Private("trl:GRPOTrainer._calculate_rewards", "wrapped: a run scoring nothing stops", "dsft/train/trainer.py"),
    Private("trl.experimental.orpo:ORPOTrainer.concatenated_forward",
            "wrapped; reads its 5th output (the NLL term) to rescale it across processes", "dsft/train/trainer.py"),
    Private("trl:GRPOTrainer.__init__", "config.beta set to 0 around it: no reference copy for a fresh adapter",
            "dsft/train/trainer.py"),
    Private("transformers:Trainer._save_optimizer_and_scheduler",
            "overridden: a model split by training.parallel writes its optimizer shards (torch.distributed.checkpoint)",
            "dsft/train/trainer.py"),
    Private("transformers:Trainer._load_optimizer_and_scheduler", "overridden: the same shards read back on resume",
            "dsft/train/trainer.py"),
    Private("transformers:Trainer._save", "overridden: a model split by training.parallel saves its adapter gathered",
            "dsft/train/trainer.py"),
    Private("transformers.distributed.mixin:DistributedMixin._is_distributed_loading_by_transformers",
            "set on a model split by training.parallel: the Trainer neither wraps nor moves it", "dsft/train/layout.py"),
    Private("transformers.distributed.parallel_utils:ALL_PARALLEL_STYLES", "dsft's expert-rows style registered",
            "dsft/moe/parallel.py"),
    Private("transformers.distributed.expert_parallel:MoEParamShard", "the expert-rows style (dim 0 over EP)",
            "dsft/moe/parallel.py"),
    Private("transformers.distributed.expert_parallel:apply_expert_parallelism", "called with dsft's expert plan",
            "dsft/moe/parallel.py"),
    Private("transformers.distributed.fsdp:apply_fully_sharded_data_parallelism",
            "called: FSDP2 on the decoder layers, the experts on the expert-FSDP axis", "dsft/moe/parallel.py"),
    Private("torch.distributed.fsdp:FSDPModule._get_fsdp_state",
            "the FSDP2 root's lazy init, run before GRPO generates under training.parallel", "dsft/train/trainer.py"),
    Private("torch.nn:Module._apply", "called with a function of meta tensors only (to_empty's, FSDP2's meta-device "
            "initialisation of a rank's shards of the weights outside the experts)", "dsft/models/shards.py"),
    Private("transformers:Trainer._load_from_checkpoint", "called to load a checkpoint's weights for eval on resume",
            "dsft/train/resume.py"),
    Private("peft.utils.transformers_weight_conversion:convert_peft_config_for_transformers",
            "replaced process-wide by a guard that leaves dsft's expert adapters alone", "dsft/adapters/peft_guard.py"),
    Private("peft.utils.transformers_weight_conversion:convert_peft_adapter_state_dict_for_transformers",
            "replaced process-wide by the same guard", "dsft/adapters/peft_guard.py"),
)
# attributes set in __init__ (not on the class): `_metrics` (GRPOTrainer, SFTTrainer: per-mode lists dsft
# appends to and reads) and `_logs` (GRPOTrainer: the latest generation's prompts, completions, rewards)
INSTANCE = {"trl:GRPOTrainer": ("_metrics", "_logs"), "trl:SFTTrainer": ("_metrics",)}


def installed(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def minor(text: str) -> str:
    return ".".join(text.split("+")[0].split(".")[:2])


def outside_tested() -> list[str]:
    """One line per installed package whose minor version is not the one dsft was checked on."""
    lines = []
    for package, tested in TESTED.items():
        found = installed(package)
        if found is not None and minor(found) != tested:
            lines.append(f"{package} {found} (dsft was checked on {tested}.x)")
    return lines


def missing() -> list[str]:
    """Every private member dsft uses that the installed versions lack."""
    return [f"{p.path} ({p.use}; {p.where})" for p in PRIVATE if not p.found()]
