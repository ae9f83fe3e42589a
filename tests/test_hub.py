"""Hugging Face Hub ids in a recipe, resolved through a hub cache laid out on disk with the network off (as
huggingface_hub lays it out: OWNER--NAME/refs/main holding the commit, snapshots/COMMIT/ holding the files)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import legal_rows, write_jsonl

COMMIT = "0123456789abcdef0123456789abcdef01234567"
DATA_COMMIT = "89abcdef0123456789abcdef0123456789abcdef"


def _snapshot(cache: Path, kind: str, repo: str, commit: str) -> Path:
    root = cache / f"{kind}s--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs/main").write_text(commit)
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A hub cache holding the model acme/tiny-v3 (the built-in tiny DeepSeek-V3) and the dataset acme/legal-qa
    (train and test splits, data/ files named as the Hub names them); the network off, as the user set it."""
    import huggingface_hub.constants

    from dsft.models.load import resolve_model_path

    cache = tmp_path / "hub"
    model = _snapshot(cache, "model", "acme/tiny-v3", COMMIT)
    for f in resolve_model_path("builtin:tiny-deepseek-v3").iterdir():
        shutil.copy(f, model / f.name)
    data = _snapshot(cache, "dataset", "acme/legal-qa", DATA_COMMIT)
    (data / "data").mkdir()
    write_jsonl(data / "data/train-00000-of-00001.jsonl", legal_rows(12))
    write_jsonl(data / "data/test-00000-of-00001.jsonl", legal_rows(16)[12:])
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("DSFT_USER_HF_HUB_OFFLINE", "1")
    return cache


def test_a_run_from_hub_ids_records_the_commits(hub_cache: Path, tmp_path: Path, cli) -> None:
    recipe = tmp_path / "hub.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"path": "acme/tiny-v3", "dtype": "float32"},
        "data": {"train": "acme/legal-qa", "eval": [{"hub": "acme/legal-qa", "split": "test"}], "max_length": 128},
        "adapter": {"r": 4, "alpha": 8, "routed_experts": {1: [0]}},
        "training": {"max_steps": 1, "micro_batch_size": 4}, "output_dir": str(tmp_path / "run")}))
    assert cli("validate", recipe).exit_code == 0
    assert cli("validate", recipe, "--check-files").exit_code == 0
    result = cli("sft", "--recipe", recipe)
    assert result.exit_code == 0, result.output
    info = json.loads((tmp_path / "run/run.json").read_text())
    assert info["base_model"]["path"] == "acme/tiny-v3" and info["base_model"]["hub_commit"] == COMMIT
    sources = info["data_sources"]
    assert {s["split"] for s in sources.values()} == {"train", "test"}
    assert all(s["hub"] == "acme/legal-qa" and s["commit"] == DATA_COMMIT for s in sources.values())
    assert info["summary"]["train_rows"] == 12
    card = (tmp_path / "run/README.md").read_text()
    assert f"Hugging Face Hub commit: `{COMMIT}`" in card and f"Hub dataset `acme/legal-qa`, split `train`, commit `{DATA_COMMIT}`" in card
    merged = cli("merge", "--adapter", tmp_path / "run", "--out", tmp_path / "merged")
    assert merged.exit_code == 0, merged.output


@pytest.mark.parametrize("changes, expected", [
    ({"model": {"path": "acme/other-model"}}, "model.path: acme/other-model is no local directory, and the model "
     "acme/other-model is not in the Hugging Face cache"),
    ({"data": {"train": "acme/other-data"}}, "data.train[0]: acme/other-data is no local file, and the dataset "
     "acme/other-data is not in the Hugging Face cache"),
    ({"data": {"train": [{"hub": "acme/legal-qa", "split": "validation"}]}},
     "data.train[0]: acme/legal-qa has no split 'validation' (it has test, train); give `split:`"),
    ({"model": {"revision": "v2"}}, "model.revision: only with a Hugging Face Hub id in model.path"),
])
def test_a_hub_id_that_cannot_be_resolved_is_one_line(hub_cache: Path, make_recipe, cli, changes: dict,
                                                      expected: str) -> None:
    from test_bad_inputs import refused

    refused(cli("sft", "--recipe", make_recipe(**changes)), expected)
