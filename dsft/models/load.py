"""Load a checkpoint and its tokenizer with transformers' native classes (model skeleton), filled by
dsft's streaming loader (dsft.models.stream).

Never runs code from a checkpoint directory: DeepSeek checkpoints carry `auto_map` entries pointing at
remote modeling files; dsft loads them with `trust_remote_code=False`, which picks transformers' own
DeepseekV2/V3 classes from `model_type`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dsft.models.builtin import PREFIX as BUILTIN_PREFIX

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_path(path: str, revision: str | None = None) -> Path:
    """model.path as a local checkpoint directory: a built-in model (built once into DSFT_CACHE), a Hugging Face
    Hub id (its snapshot in the Hugging Face cache, dsft.hub), or the path itself."""
    if path.startswith(BUILTIN_PREFIX):
        from dsft.models.builtin import builtin_path

        return builtin_path(path[len(BUILTIN_PREFIX):])
    from dsft.hub import is_repo_id

    if is_repo_id(path):
        from dsft.hub import model_snapshot

        return model_snapshot(path, revision)
    return Path(path)


def resolve_dtype(name: str) -> torch.dtype:
    """`auto` is bfloat16 on CUDA and float32 elsewhere: bf16 matmuls on CPU are ~100x slower."""
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return DTYPES[name]


def load_tokenizer(path: Path, chat_template_file: str | None = None) -> Any:
    """The checkpoint's tokenizer (or an adapter's copy), with the recipe's chat template if given; a
    tokenizer that cannot be read or a template that is not valid Jinja is one line naming the file."""
    from transformers import AutoTokenizer

    from dsft.errors import DsftError

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - tokenizers and transformers raise many types for damaged files
        raise DsftError(f"{path}: the tokenizer files cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
                        "re-download tokenizer.json / tokenizer_config.json") from None
    if chat_template_file:
        try:
            tokenizer.chat_template = Path(chat_template_file).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise DsftError(f"{chat_template_file}: not UTF-8 text; save the chat template as UTF-8") from None
        check_template(tokenizer.chat_template, chat_template_file)
    elif isinstance(tokenizer.chat_template, str):
        check_template(tokenizer.chat_template, str(path / "chat template"))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_template(text: str, where: str) -> None:
    """Compile a chat template as transformers will render it (its sandboxed Jinja environment)."""
    from jinja2 import TemplateSyntaxError
    from transformers.utils.chat_template_utils import _compile_jinja_template

    from dsft.errors import DsftError

    try:
        _compile_jinja_template(text)
    except TemplateSyntaxError as e:
        raise DsftError(f"{where}:{e.lineno}: the chat template is not valid Jinja ({e.message}); fix the template") from None


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def load_model(section: Any, path: Path, expert_parallel: int = 1, rest_later: bool = False) -> torch.nn.Module:
    """The frozen base model, routed experts as DsftExperts (NF4 with `quantization: nf4`). `section` is the recipe's
    ModelSection (dsft.config.schema; read by attribute, since models sit below config). With
    `expert_parallel` M > 1 this rank reads and holds only the 1/M of every layer's experts that expert
    parallelism gives it (dsft.moe.parallel: the contiguous block of rank % M), never opening the others. With
    `rest_later` every other parameter is a placeholder until dsft.models.shards.read_rest reads it (once the model
    is laid out: only the rank's FSDP2 shard)."""
    from dsft.models.stream import load_streaming

    part = None
    if expert_parallel > 1:
        import torch.distributed as dist

        part = (dist.get_rank() % expert_parallel, expert_parallel)
    return load_streaming(path, resolve_dtype(section.dtype), section.quantization == "nf4", device(),
                          section.attn_implementation, expert_part=part, rest_later=rest_later)


def load_companion(section: Any, path: Path, base: torch.nn.Module) -> torch.nn.Module:
    """A model of the same checkpoint sharing `base`'s routed experts, the rest placeholders (dsft.models.stream)."""
    from dsft.models.stream import load_companion as companion

    return companion(base, path, resolve_dtype(section.dtype), section.quantization == "nf4", device(),
                     section.attn_implementation)


def world_size() -> int:
    """Processes in this run's process group (1 outside `accelerate launch` / torchrun)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
