"""Prepared data: tokenized once into the cache, bit for bit what dsft tokenized before and what TRL would,
found again by every later run, and never trusted when damaged."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

import reference_tokenize as reference
from conftest import REPO, legal_rows, write_jsonl
from dsft.data.formats import load_conversations
from dsft.data.preference import load_pairs
from dsft.data.prepared import Spec, prepare
from dsft.data.store import entries
from dsft.errors import DsftError
from dsft.models.load import load_tokenizer, resolve_model_path
from test_bad_inputs import refused

TEMPLATES = [None, *sorted((REPO / "data_templates/chat_templates").glob("*.jinja"))]
REASONING = "<think>\nThe statute says so; the exception does not apply.\n</think>\n\nThe contract is void."


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A DSFT_CACHE of the test's own, its built-in models the session's (linked)."""
    resolve_model_path("builtin:tiny-deepseek-v3")
    root = tmp_path / "cache"
    root.mkdir()
    os.symlink(Path(os.environ["DSFT_CACHE"]) / "builtin", root / "builtin")
    monkeypatch.setenv("DSFT_CACHE", str(root))
    return root


def _tokenizer(template: Path | None = None):
    return load_tokenizer(resolve_model_path("builtin:tiny-deepseek-v3"), str(template) if template else None)


def _files(tmp: Path) -> dict[str, tuple[str, str]]:
    """One file per format and shape of row: name -> (path, format)."""
    multi = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Q{i}?"},
                           {"role": "assistant", "content": f"A{i}."}, {"role": "user", "content": "And then?"},
                           {"role": "assistant", "content": "Nothing more."}]} for i in range(3)]
    r1 = [{"messages": [{"role": "user", "content": f"Is contract {i} valid?"}, {"role": "assistant", "content": REASONING}]}
          for i in range(3)]
    files = {name: (str(REPO / f"data_templates/examples/{name}.jsonl"), name)
             for name in ("messages", "prompt_completion", "alpaca")}
    files["legal"] = (str(REPO / "data_templates/legal/train.jsonl"), "messages")
    files["multi-turn"] = (str(write_jsonl(tmp / "multi.jsonl", multi)), "messages")
    files["r1-trace"] = (str(write_jsonl(tmp / "r1.jsonl", r1)), "messages")
    return files


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda t: t.stem if t else "builtin")
def test_tokens_equal_the_reference_for_every_format_and_template(template: Path | None, cache: Path, tmp_path: Path) -> None:
    """Unpacked input ids and labels equal dsft's per-row tokenization before the cache, bit for bit."""
    tokenizer = _tokenizer(template)
    for name, (path, fmt) in _files(tmp_path).items():
        for assistant_only in (True, False):
            tokens = prepare(Spec("sft", [path], fmt, name, assistant_only=assistant_only), tokenizer, quiet=True)
            expected = reference.tokenize_all(tokenizer, load_conversations([path], fmt), None, assistant_only)
            assert tokens.rows(range(len(tokens))) == expected, (name, assistant_only)
            for max_length in (8, 16, 40, 4096):
                assert tokens.stats(max_length) == reference.truncation(expected, max_length), (name, max_length)
                kept = [i for i, labels in enumerate(expected["labels"]) if any(x != -100 for x in labels[:max_length])]
                assert tokens.trainable(max_length)["length"] == [len(expected["input_ids"][i]) for i in kept]


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda t: t.stem if t else "builtin")
def test_dpo_pairs_equal_what_trl_would_make_of_them(template: Path | None, cache: Path) -> None:
    """prompt_ids / chosen_ids / rejected_ids equal TRL's DPOTrainer._prepare_dataset on the same fitted pairs."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    fit_prompts = reference.fit_prompts

    tokenizer = _tokenizer(template)
    for name in ("legal/preference", "examples/preference", "examples/preference_conversational"):
        path = str(REPO / f"data_templates/{name}.jsonl")
        for limit, overflow in ((512, "truncate"), (12, "truncate"), (12, "drop")):
            fit = {"max_prompt_length": limit, "prompt_overflow": overflow}
            pairs = load_pairs([path])
            try:
                fitted = fit_prompts(pairs, tokenizer, limit, overflow)
            except DsftError as e:  # the template alone is longer than the limit: refused alike
                with pytest.raises(DsftError, match=e.lines[0].split(" is shorter")[0]):
                    prepare(Spec("dpo", [path], "preference", fit=fit), tokenizer, quiet=True)
                continue
            if not fitted.rows:
                continue
            tokens = prepare(Spec("dpo", [path], "preference", fit=fit), tokenizer, quiet=True)
            trl = DPOTrainer._prepare_dataset(SimpleNamespace(_tokenizer=tokenizer), Dataset.from_list(fitted.rows), tokenizer,
                                              DPOConfig(output_dir=str(cache / "unused"), max_length=None, use_cpu=True, bf16=False), "train")
            ours = tokens.dataset[:]
            for column in ("prompt_ids", "chosen_ids", "rejected_ids"):
                assert ours[column] == trl[column], (name, limit, overflow, column)
            assert tokens.meta["counts"] == {"rows": len(pairs), "truncated": fitted.truncated, "dropped": fitted.dropped}


def test_eval_pairs_score_the_conversations_as_before(cache: Path) -> None:
    tokenizer = _tokenizer()
    path = str(REPO / "data_templates/legal/preference.jsonl")
    tokens = prepare(Spec("pairs", [path], "preference"), tokenizer, quiet=True)
    pairs = load_pairs([path])
    chosen = reference.tokenize_all(tokenizer, [p["prompt"] + p["chosen"] for p in pairs], None, True)
    rejected = reference.tokenize_all(tokenizer, [p["prompt"] + p["rejected"] for p in pairs], None, True)
    assert tokens.rows(range(len(pairs))) == chosen and tokens.rejected(range(len(pairs))) == rejected


def test_parallel_workers_write_the_same_tokens(cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Worker processes (forced on for a small file) give the tokens one process gives."""
    from dsft.data import build

    path = write_jsonl(tmp_path / "d.jsonl", legal_rows(228) * 5)
    tokenizer = _tokenizer()
    one = prepare(Spec("sft", [str(path)], "messages"), tokenizer, num_proc=1, quiet=True)
    expected = one.rows(range(len(one)))
    from dsft.data import store

    for entry in entries():
        store.remove(store.Entry(entry))
    monkeypatch.setattr(build, "PARALLEL_BYTES", 0)
    monkeypatch.setattr(build, "CHUNK", 100)
    two = prepare(Spec("sft", [str(path)], "messages"), tokenizer, num_proc=2, quiet=True)
    assert len(two) == 1140 and two.rows(range(len(two))) == expected


def test_a_kind_not_in_the_table_is_an_error_not_another_kind(tmp_path: Path) -> None:
    from dsft.data.kinds import KINDS, encode_rows

    assert set(KINDS) == {"sft", "pairs", "dpo", "kto", "prompt"}
    with pytest.raises(ValueError, match="unknown prepared-data kind 'unpaired'"):
        encode_rows(_tokenizer(), Spec("unpaired", [], "kto"), [])


# ---------------------------------------------------------------- the cache's rules

def _spec(path: Path) -> Spec:
    return Spec("sft", [str(path)], "messages")


def test_a_second_prepare_is_a_hit_and_a_copy_with_the_same_bytes_too(cache: Path, tmp_path: Path, capsys,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from dsft.data import prepared

    path = write_jsonl(tmp_path / "d.jsonl", legal_rows(20))
    tokenizer = _tokenizer()
    first = prepare(_spec(path), tokenizer)
    assert "tokenized 20 rows" in capsys.readouterr().out
    monkeypatch.setattr(prepared, "build", lambda *a, **k: pytest.fail("built again"))
    again = prepare(_spec(path), tokenizer)
    assert f"data.train: tokens from cache (20 rows, {first.tokens:,} tokens" in capsys.readouterr().out
    copy = write_jsonl(tmp_path / "copy.jsonl", legal_rows(20))  # another path, size and time: the same content
    assert prepare(_spec(copy), tokenizer).path == again.path == first.path
    assert len(json.loads((first.path / "meta.json").read_text())["stat_keys"]) == 2


def test_what_changes_the_tokens_changes_the_key(cache: Path, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", legal_rows(6))
    tokenizer = _tokenizer()
    keys = {prepare(_spec(path), tokenizer, quiet=True).path}
    keys.add(prepare(Spec("sft", [str(path)], "messages", system_prompt="Be terse."), tokenizer, quiet=True).path)
    keys.add(prepare(Spec("sft", [str(path)], "messages", assistant_only=False), tokenizer, quiet=True).path)
    keys.add(prepare(_spec(path), _tokenizer(REPO / "data_templates/chat_templates/deepseek-v2.jinja"), quiet=True).path)
    write_jsonl(path, legal_rows(7))
    keys.add(prepare(_spec(path), tokenizer, quiet=True).path)
    assert len(keys) == 5 and len(entries()) == 5


@pytest.mark.parametrize("damage", ["truncate", "meta-garbage", "meta-missing", "data-missing"])
def test_a_damaged_entry_is_rebuilt_with_a_warning(damage: str, cache: Path, tmp_path: Path, capsys) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", legal_rows(20))
    tokenizer = _tokenizer()
    entry = prepare(_spec(path), tokenizer, quiet=True)
    expected = entry.rows(range(len(entry)))
    data, meta = entry.path / "data.arrow", entry.path / "meta.json"
    {"truncate": lambda: data.write_bytes(data.read_bytes()[:-200]), "meta-garbage": lambda: meta.write_text("{oops"),
     "meta-missing": meta.unlink, "data-missing": data.unlink}[damage]()
    capsys.readouterr()
    again = prepare(_spec(path), tokenizer)
    out = capsys.readouterr()
    assert "is damaged" in out.err and "building it again" in out.err and "tokenized 20 rows" in out.out
    assert again.rows(range(len(again))) == expected


def test_a_damaged_entry_holding_other_files_is_moved_aside_not_deleted(cache: Path, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", legal_rows(5))
    tokenizer = _tokenizer()
    entry = prepare(_spec(path), tokenizer, quiet=True)
    (entry.path / "meta.json").write_text("{oops")
    (entry.path / "notes.txt").write_text("mine")
    again = prepare(_spec(path), tokenizer, quiet=True)
    aside = [p for p in entry.path.parent.iterdir() if ".damaged-" in p.name]
    assert len(aside) == 1 and (aside[0] / "notes.txt").read_text() == "mine" and len(again) == 5


def test_two_processes_preparing_the_same_data_build_it_once(cache: Path, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", legal_rows(228) * 8)
    code = ("import sys; from dsft.data.prepared import Spec, prepare; from dsft.models.load import load_tokenizer, "
            "resolve_model_path; prepare(Spec('sft', [sys.argv[1]], 'messages'), "
            "load_tokenizer(resolve_model_path('builtin:tiny-deepseek-v3')), num_proc=1)")
    _tokenizer()  # the built-in model in this cache, before the two start together
    procs = [subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env={**os.environ, "DSFT_CACHE": str(cache)}) for _ in range(2)]
    outputs = "".join(p.communicate(timeout=300)[0] for p in procs)
    assert all(p.returncode == 0 for p in procs), outputs
    assert outputs.count("tokenized 1,824 rows") == 1 and outputs.count("tokens from cache (1,824 rows") == 1, outputs
    assert len(entries()) == 1 and not [p for p in (cache / "data").iterdir() if p.name.startswith(".")]


def test_the_cache_holds_arrow_and_json_only(cache: Path, tmp_path: Path) -> None:
    """Nothing in the cache is pickled: every file is Arrow IPC or JSON."""
    import pyarrow as pa

    path = write_jsonl(tmp_path / "d.jsonl", legal_rows(5))
    entry = prepare(_spec(path), _tokenizer(), quiet=True)
    assert sorted(p.name for p in entry.path.iterdir()) == ["data.arrow", "meta.json"]
    with pa.memory_map(str(entry.path / "data.arrow")) as source:
        table = pa.ipc.open_stream(source).read_all()
    assert table.schema.field("input_ids").type == pa.list_(pa.int32())
    assert table.schema.field("loss_mask").type == pa.list_(pa.bool_())
    json.loads((entry.path / "meta.json").read_text())


def test_the_cache_is_small(cache: Path, tmp_path: Path) -> None:
    """At most 1.3x the int32 size of its tokens (a bit per token for the mask, a few ints per row)."""
    path = write_jsonl(tmp_path / "d.jsonl", legal_rows(228) * 4)
    entry = prepare(_spec(path), _tokenizer(), quiet=True)
    assert (entry.path / "data.arrow").stat().st_size <= 1.3 * 4 * entry.tokens


def test_bad_rows_are_named_and_nothing_is_left_in_the_cache(cache: Path, tmp_path: Path) -> None:
    from dsft.errors import DsftError

    good = legal_rows(3)
    path = write_jsonl(tmp_path / "d.jsonl", [*good, "{broken", {"messages": []}, *good])
    with pytest.raises(DsftError) as err:
        prepare(_spec(path), _tokenizer(), quiet=True)
    assert err.value.lines == [f"{path}:4: not valid JSON (Expecting property name enclosed in double quotes at column 2); "
                               "fix or remove the line",
                               f"{path}:5: field 'messages' must be a non-empty list of {{role, content}} objects"]
    assert entries() == [] and not list((cache / "data").iterdir())


# ---------------------------------------------------------------- training takes the cache as it is

def test_trl_never_tokenizes(make_recipe, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SFT and DPO: after dsft prepared the data, the tokenizer is not called again (TRL neither
    tokenizes nor renders), and the trained rows are those of the cache."""
    from dsft.train import objective as plugins
    from dsft.train import pipeline

    calls = []
    for kind, sections in (("sft", {}), ("dpo", {"data": {"train": str(REPO / "data_templates/legal/preference.jsonl"),
                                                              "format": "preference", "max_length": 256},
                                              "dpo": {"max_prompt_length": 64}})):
        recipe_path = make_recipe(f"{kind}.yaml", output_dir=str(tmp_path / kind), training={"max_steps": 2}, **sections)
        from dsft.config import load_recipe

        recipe = load_recipe(recipe_path, check_files=True)
        goal = plugins.objective(kind)
        prepared = pipeline.preflight(recipe, goal, force=False)
        tokenizer_type = type(prepared.tokenizer)
        with monkeypatch.context() as patch:
            for method in ("__call__", "apply_chat_template", "encode"):
                original = getattr(tokenizer_type, method)
                patch.setattr(tokenizer_type, method, lambda *a, _m=method, _o=original, **k: calls.append(_m) or _o(*a, **k))
            pipeline.run(prepared, goal, force=False)
        assert calls == [], f"{kind}: the tokenizer was called {len(calls)} times during the run: {sorted(set(calls))}"


def test_packing_drops_rows_without_a_loss_token_and_reports_truncation(make_recipe, cli, tmp_path: Path) -> None:
    long_question = {"messages": [{"role": "user", "content": "Why? " * 100}, {"role": "assistant", "content": "Because."}]}
    data = write_jsonl(tmp_path / "mixed.jsonl", [*legal_rows(12), long_question])
    recipe = make_recipe(data={"train": str(data), "packing": True, "max_length": 96}, training={"max_steps": 2})
    result = cli("sft", "--recipe", recipe)
    assert result.exit_code == 0, result.output
    truncation = json.loads((tmp_path / "run/run.json").read_text())["summary"]["truncation"]
    assert truncation["rows"] == 13 and truncation["no_loss_tokens"] == 1 and truncation["truncated"] >= 1
    from dsft.data.prepared import Spec as S

    tokens = prepare(S("sft", [str(data)], "messages"), _tokenizer(), quiet=True)
    assert len(tokens.trainable(96)) == 12
    # what datasets derived for the run (packed rows) went to the run's own view, never into the shared entry
    assert sorted(p.name for p in tokens.path.iterdir()) == ["data.arrow", "meta.json"]


# ---------------------------------------------------------------- dsft cache

def test_cache_list_verify_remove(cache: Path, tmp_path: Path, cli) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", legal_rows(5))
    entry = prepare(_spec(path), _tokenizer(), quiet=True)
    listed = cli("cache", "list")
    assert listed.exit_code == 0 and entry.path.name in listed.output and str(path.resolve()) in listed.output
    assert cli("cache", "verify").exit_code == 0
    write_jsonl(path, legal_rows(6))  # the source changed since it was tokenized
    stale = cli("cache", "verify", entry.path.name[:8])
    assert stale.exit_code == 1 and "changed since it was tokenized" in stale.output
    refused(cli("cache", "remove"), "name the entries (KEY...), or pass --older-than AGE or --all")
    refused(cli("cache", "remove", "--older-than", "soon"), "--older-than 'soon': give an age like 30d")
    refused(cli("cache", "verify", "ffff"), "ffff: no cache entry has this key")
    kept = cli("cache", "remove", "--older-than", "30d")
    assert kept.exit_code == 0 and "removed 0 entries" in kept.output and entry.path.is_dir()
    gone = cli("cache", "remove", "--all")
    assert gone.exit_code == 0 and "removed 1 entries" in gone.output and not entry.path.exists()


# ---------------------------------------------------------------- any changed byte is found

def _rewrite_a_token(entry_path: Path, tokens) -> tuple[int, int]:
    """Rewrite one token id of the first row in place: same size, still a valid id."""
    import numpy as np

    ids = tokens.rows([0])["input_ids"][0]
    data = bytearray((entry_path / "data.arrow").read_bytes())
    at = bytes(data).find(np.asarray(ids[:8], dtype=np.int32).tobytes())
    assert at > 0
    old = ids[3]
    data[at + 12:at + 16] = np.asarray([old + 1 if old + 1 < 1000 else old - 1], dtype=np.int32).tobytes()
    (entry_path / "data.arrow").write_bytes(bytes(data))
    return old, ids[3]


def test_a_token_rewritten_in_place_is_found_by_verify_and_by_a_run(cache: Path, tmp_path: Path, cli, capsys) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", legal_rows(20))
    tokenizer = _tokenizer()
    entry = prepare(_spec(path), tokenizer, quiet=True)
    expected = entry.rows(range(len(entry)))
    _rewrite_a_token(entry.path, entry)
    result = cli("cache", "verify", entry.path.name)
    assert result.exit_code == 1 and "data.arrow changed after dsft wrote it (its xxh3-128 checksum differs)" in result.output
    capsys.readouterr()
    again = prepare(_spec(path), tokenizer)
    out = capsys.readouterr()
    assert "is damaged (data.arrow changed after dsft wrote it" in out.err and "tokenized 20 rows" in out.out
    assert again.rows(range(len(again))) == expected
    assert cli("cache", "verify").exit_code == 0


@pytest.mark.parametrize("edit", ["value", "whitespace", "seal"])
def test_a_changed_byte_of_the_metadata_is_found(cache: Path, tmp_path: Path, cli, edit: str) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", legal_rows(5))
    entry = prepare(_spec(path), _tokenizer(), quiet=True)
    meta = entry.path / "meta.json"
    text = meta.read_text()
    changed = {"value": lambda t: t.replace('"rows": 5', '"rows": 6'), "whitespace": lambda t: t.replace(": ", ":  ", 1),
               "seal": lambda t: t.replace('"seal": "', '"seal": "0', 1)[:-3] + '\n}\n'}[edit](text)
    assert changed != text
    meta.write_text(changed)
    result = cli("cache", "verify")
    assert result.exit_code == 1 and "meta.json" in result.output, result.output


def test_cache_administration_never_trusts_an_entry_and_goes_on(cache: Path, tmp_path: Path, cli) -> None:
    """`remove --all` over: a good entry (removed), an entry that is a link to another disk (kept: dsft never
    makes one), an entry holding a user's folder named like dsft's file (kept whole), an entry whose meta.json
    has another shape (removed: only dsft's two files); `list` and `verify` show every one in a line."""
    from dsft.data.store import data_root

    path = write_jsonl(tmp_path / "d.jsonl", legal_rows(5))
    good = prepare(_spec(path), _tokenizer(), quiet=True).path
    root = data_root()
    elsewhere = tmp_path / "other-disk"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("mine")
    (root / ("b" * 20)).symlink_to(elsewhere)
    folder = root / ("c" * 20)
    (folder / "data.arrow").mkdir(parents=True)
    (folder / "data.arrow" / "notes.txt").write_text("mine")
    odd = root / ("d" * 20)
    odd.mkdir()
    (odd / "meta.json").write_text('["not", "a", "mapping"]')
    (odd / "data.arrow").write_bytes(b"x")
    listed = cli("cache", "list")
    assert listed.exit_code == 0 and "Traceback" not in listed.output, listed.output
    assert all(k in listed.output for k in (good.name, "b" * 20, "c" * 20, "d" * 20))
    verified = cli("cache", "verify")
    assert verified.exit_code == 1 and "Traceback" not in verified.output
    assert f"{'b' * 20}: a symbolic link, which dsft never makes" in verified.output
    removed = cli("cache", "remove", "--all")
    assert removed.exit_code == 1 and "Traceback" not in removed.output, removed.output
    assert "removed 2 entries" in removed.output and "2 kept" in removed.output
    assert not good.exists() and not odd.exists()
    assert (elsewhere / "keep.txt").read_text() == "mine" and (root / ("b" * 20)).is_symlink()
    assert (folder / "data.arrow" / "notes.txt").read_text() == "mine"


def test_a_zero_row_entry_is_never_cached(cache: Path, tmp_path: Path) -> None:
    """Every prompt over max_prompt_length with `drop`: one line, and nothing left in the cache."""
    from dsft.errors import DsftError

    rows = [{"prompt": "Why? " * 60, "answer": "4"}] * 3
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    spec = Spec("prompt", [str(path)], "prompt", fit={"max_prompt_length": 16, "prompt_overflow": "drop"}, section="grpo")
    with pytest.raises(DsftError, match="grpo.max_prompt_length 16: every prompt of data.train is longer"):
        prepare(spec, _tokenizer(), quiet=True)
    assert entries() == [] and not list((cache / "data").iterdir())


@pytest.mark.parametrize("section", ["orpo", "kto"])
def test_a_prompt_whose_earlier_turns_outgrow_max_prompt_length_names_its_sections_key(section: str, cache: Path,
                                                                                      tmp_path: Path) -> None:
    """prompt_overflow: truncate cuts the last user turn; when the template and earlier turns alone are longer, the
    error names the key of the section the limit came from (it named dpo's for every objective)."""
    from dsft.errors import DsftError

    long_turn = " ".join(["clause"] * 80)
    pair = {"prompt": [{"role": "user", "content": long_turn}, {"role": "assistant", "content": "Noted."},
                       {"role": "user", "content": "And the remedy?"}],
            "chosen": [{"role": "assistant", "content": "Damages."}], "rejected": [{"role": "assistant", "content": "None."}]}
    path = write_jsonl(tmp_path / "pairs.jsonl", [pair])
    spec = Spec("dpo" if section == "orpo" else "kto", [str(path)], "preference",
                fit={"max_prompt_length": 16, "prompt_overflow": "truncate"}, section=section)
    with pytest.raises(DsftError, match=rf"^{section}\.max_prompt_length 16 is shorter than the prompt's template"):
        prepare(spec, _tokenizer(), quiet=True)
