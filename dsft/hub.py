"""Hugging Face Hub ids in a recipe: `model.path: deepseek-ai/DeepSeek-V2-Lite` (with `model.revision`) and
`data.train: [org/dataset]` or `{hub: org/dataset, split: train, name: SUBSET, revision: REV}`, resolved through
huggingface_hub's own cache (HF_HUB_CACHE) to the local files dsft then reads like any other.

dsft's libraries run offline (dsft.cli._common.offline); a hub id is the one thing dsft fetches, and only when
the user's environment allows it: with HF_HUB_OFFLINE set by the user (before dsft starts) an id resolves from
the cache alone, and one that is not there is one line saying how to get it. The resolved commit (the
snapshot's name) is recorded in run.json and the model card. A model is fetched as safetensors weights,
configs and tokenizer files only (never pickles, never code). A dataset's split is resolved to its data files
the way `datasets` does (dataset card configs, file-name conventions), and those files are read by dsft's own
readers (JSONL, CSV, Parquet).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode

from dsft.errors import DsftError

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
SCHEME = "hf://datasets/"
USER_OFFLINE = "DSFT_USER_HF_HUB_OFFLINE"  # HF_HUB_OFFLINE as the user set it, before dsft's own default
MODEL_FILES = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt", "*.tiktoken"]


def is_repo_id(text: str) -> bool:
    """`owner/name` that is no local path and no data file name: a Hub repo id."""
    return bool(REPO_ID.match(text)) and not Path(text).exists() and not text.lower().endswith(DATA_SUFFIXES)


def remember_user_offline() -> None:
    """Note whether the user set HF_HUB_OFFLINE, before dsft sets it for its libraries (and for child processes)."""
    if USER_OFFLINE not in os.environ:
        os.environ[USER_OFFLINE] = os.environ.get("HF_HUB_OFFLINE", "")


def user_offline() -> bool:
    value = os.environ.get(USER_OFFLINE, os.environ.get("HF_HUB_OFFLINE", ""))
    return value.strip().lower() in ("1", "true", "yes", "on")


@contextlib.contextmanager
def _network() -> Iterator[None]:
    """huggingface_hub allowed online for the block, unless the user asked for offline."""
    import huggingface_hub.constants as constants

    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = user_offline()
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


# ---------------------------------------------------------------- data entries as strings

def data_uri(repo: str, split: str | None = None, name: str | None = None, revision: str | None = None) -> str:
    """A hub dataset split as one data.train string: `hf://datasets/OWNER/NAME?split=S&name=N&revision=R`."""
    query = {k: v for k, v in (("split", split), ("name", name), ("revision", revision)) if v}
    return SCHEME + repo + (f"?{urlencode(query, quote_via=quote)}" if query else "")


def parse_data_uri(text: str) -> dict[str, str | None] | None:
    """{repo, split, name, revision} of a data_uri string, or None for a path."""
    if not text.startswith(SCHEME):
        return None
    repo, _, query = text[len(SCHEME):].partition("?")
    fields = dict(parse_qsl(query))
    return {"repo": repo, "split": fields.get("split"), "name": fields.get("name"), "revision": fields.get("revision")}


# ---------------------------------------------------------------- resolving

def snapshot(repo: str, repo_type: str, revision: str | None, key: str, patterns: list[str] | None = None) -> Path:
    """The local snapshot of `repo` at `revision` (huggingface_hub's cache; fetched when the user's environment
    allows the network), or one line saying why there is none."""
    from huggingface_hub import snapshot_download
    from huggingface_hub import errors as hub_errors

    kind = "dataset" if repo_type == "dataset" else "model"
    at = f"{repo}" + (f" (revision {revision})" if revision else "")
    try:
        with _network():
            return Path(snapshot_download(repo, repo_type=repo_type, revision=revision, allow_patterns=patterns,
                                          local_files_only=user_offline()))
    except (hub_errors.LocalEntryNotFoundError, hub_errors.OfflineModeIsEnabled):
        from huggingface_hub.constants import HF_HUB_CACHE

        how = "HF_HUB_OFFLINE is set" if user_offline() else "the Hub cannot be reached"
        local = "file" if kind == "dataset" else "directory"
        raise DsftError(f"{key}: {repo} is no local {local}, and the {kind} {at} is not in the Hugging Face cache "
                        f"({HF_HUB_CACHE}) while {how}; fix the path, or fetch it "
                        f"once with `hf download {repo}{' --repo-type dataset' if kind == 'dataset' else ''}"
                        f"{f' --revision {revision}' if revision else ''}` (or unset HF_HUB_OFFLINE), or give a local "
                        "path") from None
    except hub_errors.RevisionNotFoundError:
        raise DsftError(f"{key}: the {kind} {repo} has no revision {revision!r}; give a branch, tag or commit it has") from None
    except hub_errors.RepositoryNotFoundError:
        raise DsftError(f"{key}: no {kind} {repo} on the Hub (or it is private: log in with `hf auth login`); check "
                        "the id") from None
    except (hub_errors.HfHubHTTPError, OSError) as e:
        raise DsftError(f"{key}: fetching the {kind} {at} failed ({str(e).splitlines()[0][:160]}); try again, or give a "
                        "local path") from None


def model_snapshot(repo: str, revision: str | None, key: str = "model.path") -> Path:
    """A hub model as a local checkpoint directory (safetensors, configs, tokenizer; no pickles, no code)."""
    return snapshot(repo, "model", revision, key, MODEL_FILES)


def commit_of(path: Path) -> str | None:
    """The commit a snapshot directory holds (its name, huggingface_hub's layout), or None for any other path."""
    path = Path(path)
    return path.name if path.parent.name == "snapshots" and re.fullmatch(r"[0-9a-f]{40}", path.name) else None


def dataset_files(repo: str, split: str | None, name: str | None, revision: str | None, key: str,
                  default_splits: tuple[str, ...] = ("train",)) -> tuple[list[str], dict[str, Any]]:
    """The data files of one split of a hub dataset, in order, and the record of what was resolved (repo, split,
    subset, revision asked, commit found)."""
    root = snapshot(repo, "dataset", revision, key)
    from datasets import load_dataset_builder

    try:
        builder = load_dataset_builder(str(root), name)
    except ValueError as e:
        raise DsftError(f"{key}: {repo}: {str(e).splitlines()[0][:200]}; give `name:` one of its subsets") from None
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds for a repo that holds no data files
        raise DsftError(f"{key}: {repo} holds no data files dsft can read ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:160]})") from None
    splits = {k: [str(f) for f in v] for k, v in (builder.config.data_files or {}).items()}
    chosen = split or next((s for s in default_splits if s in splits), None)
    if chosen not in splits:
        raise DsftError(f"{key}: {repo} has no split {chosen or ' or '.join(default_splits)!r} (it has "
                        f"{', '.join(sorted(splits)) or 'none'}); give `split:`")
    files = splits[chosen]
    odd = [f for f in files if not f.lower().endswith(DATA_SUFFIXES)]
    if odd:
        raise DsftError(f"{key}: {repo} split {chosen} is stored as {Path(odd[0]).suffix or 'files without a suffix'}; "
                        "dsft reads JSONL, CSV and Parquet: convert it, or use a dataset stored so")
    return files, {"hub": repo, "split": chosen, "name": name, "revision": revision, "commit": commit_of(root)}
