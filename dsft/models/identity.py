"""Which base model a run trained on, and whether a checkpoint is that model: the one owner of the check.

A run records the base's identity (`model_identity`): its architecture keys from config.json and a
fingerprint of its weights. The fingerprint is cheap at any size: per weight file its name, size,
safetensors header (every tensor's name, dtype, shape and offsets) and 16 blocks of 64 KiB sampled
evenly through its data (a file under 1 MiB is hashed whole). Two checkpoints with the same config but
other weights (another fine-tune, another seed) differ in it; a copy of the same files does not.

`check_base` compares a recorded identity with a checkpoint directory. merge, export, eval, chat,
resume and an adapter continued by another objective all call it: an architecture that differs is
refused (the adapter's shapes would not fit), other weights are refused unless the command's --force
says the user means it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from dsft.arch import IDENTITY
from dsft.errors import DsftError

SAMPLES, BLOCK, WHOLE = 16, 64 * 1024, 1 << 20
FINGERPRINT = "weights_fingerprint"


def weight_files(path: Path) -> list[Path]:
    """The checkpoint's safetensors weight files (its index's shards, or model.safetensors)."""
    from dsft.models.files import shard_names

    try:
        return [path / name for name in shard_names(path)]
    except ValueError as e:
        raise DsftError(str(e)) from None


def weights_fingerprint(path: Path) -> str:
    """sha256 over each weight file's name, size, header and sampled data (see the module docstring)."""
    import struct

    h = hashlib.sha256()
    for f in weight_files(path):
        size = f.stat().st_size
        h.update(f"{f.name}\0{size}\0".encode())
        with f.open("rb") as fh:
            if size <= WHOLE:
                h.update(fh.read())
                continue
            (length,) = struct.unpack("<Q", fh.read(8))
            h.update(fh.read(length))
            start = 8 + length
            span = max(size - start - BLOCK, 0)
            for i in range(SAMPLES):
                fh.seek(start + span * i // (SAMPLES - 1))
                h.update(fh.read(BLOCK))
    return h.hexdigest()


def model_identity(path: Path, model_path: str) -> dict[str, Any]:
    """What an adapter was trained on, recorded in run.json and dsft_adapter.json."""
    raw = (path / "config.json").read_bytes()
    cfg = json.loads(raw)
    keys = ("architectures", *IDENTITY)
    from dsft.hub import commit_of

    commit = commit_of(path)  # a Hub id's snapshot: the commit it was
    return {"path": model_path, "resolved_path": str(path.resolve()), "config_sha256": hashlib.sha256(raw).hexdigest(),
            FINGERPRINT: weights_fingerprint(path), **({"hub_commit": commit} if commit else {}),
            **{k: cfg.get(k) for k in keys}}


def architecture_mismatches(config: dict[str, Any], recorded: dict[str, Any]) -> list[str]:
    """How a base config.json differs from a recorded identity in the keys that decide the shapes."""
    return [f"{k} {config.get(k)!r} (adapter: {recorded[k]!r})" for k in IDENTITY
            if recorded.get(k) is not None and config.get(k) != recorded[k]]


def check_base(recorded: dict[str, Any] | None, path: Path, key: str, force: bool = False,
               force_hint: str | None = "pass --force to use it anyway", weights: bool = True) -> bool:
    """Refuse `path` unless it is the base `recorded` describes. Another architecture is always refused;
    the same architecture with other weights is refused unless `force` (when `force_hint` is None the
    command has no such choice; `weights=False` checks the architecture only, before the checkpoint's own
    files are checked). Returns whether the weights were checked and agree (False: the record has no
    fingerprint, an adapter from before dsft recorded one, or --force let other weights through)."""
    if not recorded:
        return False
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    wrong = architecture_mismatches(config, recorded)
    if wrong:
        raise DsftError(f"{key}: {path} is not the model this adapter was trained on: {'; '.join(wrong)}; "
                        "use the checkpoint it was trained on")
    expected = recorded.get(FINGERPRINT)
    if not expected or not weights:
        return False
    found = weights_fingerprint(path)
    if found == expected:
        return True
    if force and force_hint is not None:
        return False
    where = recorded.get("resolved_path") or recorded.get("path") or "another checkpoint"
    fix = f"point it at the checkpoint it was trained on ({where})"
    raise DsftError(f"{key}: {path} has the architecture but not the weights this adapter was trained on (weights "
                    f"fingerprint {found[:12]}, recorded {expected[:12]} from {where}); {fix}"
                    + (f", or {force_hint}" if force_hint else ""))
