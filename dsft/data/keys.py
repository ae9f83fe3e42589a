"""What decides a prepared entry's tokens, and so its key in the cache: the files (each one's sha256, or on
the fast path its path, size, modification time and inode), the tokenizer (its backend's canonical JSON,
special tokens and chat template), the settings that change tokens (Spec) and VERSION of the rules."""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsft.data.store import FORMAT

VERSION = 4  # of the tokenization rules and the entry layout (dsft.data.store): bump when either changes

SHA256: dict[tuple, str] = {}


def stat_of(path: Path) -> tuple:
    """(resolved path, size, modification time, inode): the fast key of a file as it is now."""
    st = path.stat()
    return str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino


def file_sha256(path: Path) -> str:
    """A file's sha256, computed once per process for the same file, size and modification time (and taken
    from the cache entry that recorded it for that file as it is now)."""
    key = stat_of(path)
    if key not in SHA256:
        h = hashlib.sha256()
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        SHA256[key] = h.hexdigest()
    return SHA256[key]


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """What of a tokenizer decides tokens: its backend's canonical JSON (vocabulary, merges, normalizer,
    pre-tokenizer), its special tokens and its chat template. Two copies of one tokenizer (a checkpoint's and
    the one a run saved with its adapter) agree."""
    cached = getattr(tokenizer, "_dsft_fingerprint", None)
    if cached is not None and cached[0] == tokenizer.chat_template:
        return cached[1]
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update((backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)).encode())
    special = {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}
    h.update(json.dumps([special, tokenizer.chat_template, type(tokenizer).__name__], sort_keys=True).encode())
    digest = h.hexdigest()
    with contextlib.suppress(AttributeError):
        tokenizer._dsft_fingerprint = (tokenizer.chat_template, digest)
    return digest


@dataclass
class Spec:
    """One split to prepare: its kind, files (in order), their row format and the settings that change tokens."""

    kind: str
    files: list[str]
    fmt: str
    what: str = "data.train"  # how the split is named on the console and in errors
    system_prompt: str | None = None
    assistant_only: bool = True
    fit: dict[str, Any] | None = None  # prompt fitting (dpo, kto, prompt kinds): max_prompt_length, prompt_overflow
    section: str = ""  # the recipe section those settings come from, to name its keys in errors (not in the key)
    formats: list[str] | None = None  # per file its own row format (data.train's `{path, format}`); None: fmt for all
    columns: list[dict[str, str] | None] | None = None  # per file its column map (`{path, columns}`), or None

    def setting(self, name: str) -> str:
        """A prompt-fitting setting's recipe key as errors name it (`kto.max_prompt_length`)."""
        return f"{self.section}.{name}" if self.section else name

    def file_format(self, i: int) -> str:
        return (self.formats[i] if self.formats else None) or self.fmt

    def file_columns(self, i: int) -> dict[str, str] | None:
        return self.columns[i] if self.columns else None

    def parts(self, tokenizer: Any, files: list[Any]) -> dict[str, Any]:
        per_file = [[self.file_format(i), self.file_columns(i)] for i in range(len(self.files))]
        return {"format": FORMAT, "version": VERSION, "kind": self.kind, "files": files, "row_format": self.fmt,
                "per_file": per_file if (self.formats or self.columns) else None,
                "system_prompt": self.system_prompt, "assistant_only": self.assistant_only, "dpo": self.fit,  # (the key's old name: entries keep their keys)
                "tokenizer": tokenizer_fingerprint(tokenizer)}

    def stat_key(self, tokenizer: Any) -> str:
        return digest(self.parts(tokenizer, [list(stat_of(Path(f))) for f in self.files]))

    def key(self, tokenizer: Any) -> str:
        return digest(self.parts(tokenizer, [file_sha256(Path(f)) for f in self.files]))


def digest(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()
