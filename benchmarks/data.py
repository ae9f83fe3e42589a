"""Data preparation at scale: dsft's tokenization into the prepared-data cache against the fair baseline,
cold and warm, with peak memory, on synthetic chat rows (CPU only).

The rows are legal-style conversations (system, user, assistant) of about 180 to 1,550 tokens with the
built-in tokenizer (mean about 850). Every case runs in a child process of its own, which reports its
time and peak RSS (the largest of the process and its workers):

  baseline     each conversation rendered once with the chat template (timed alone: `render`), then the
               same fast tokenizer called on batches of 1000 rendered texts (`tokenize`): no labels, no
               files written. The rate dsft's cold path is measured against.
  dsft-cold    dsft.data.prepared.prepare on an empty cache: rows read and checked streaming from the
               JSONL file, assistant-only labels, Arrow written (data.num_proc = the cores).
  dsft-cold-1  the same with one process.
  dsft-warm    prepare again in a new process (a second run, a second rank): the cache is hit (its checksum
               and seal checked: every byte of the tokens read once).
  dsft-check   that check alone (dsft.data.store.problem on the entry, full): what a hit pays for trusting no
               byte it did not check; its note gives the rate in GiB/s.
  dsft-resume  what `--resume` adds: the data file's sha256 re-checked, then the hit.
  dsft-before  (with --before N) the per-row tokenization dsft used before the cache (tests/reference_tokenize.py)
               on the first N rows, for the record.

Prints one table (rows/s and the ratio to the baseline's rate, measured in the same run) and the cache's
size against the int32 size of its tokens; --json writes the rows. Targets, reported and not asserted:
cold >= 0.8x the baseline, warm and resume < 2 s for 100k rows, peak RSS < 3 GB per process, cache
<= 1.3x int32.

    python benchmarks/data.py                       # 100,000 rows (~85M tokens)
    python benchmarks/data.py --rows 1000000 --cases dsft-cold,dsft-warm   # the 1M-row memory check
    python benchmarks/data.py --smoke               # 600 rows, every case in one process: checks the script (CI)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CASES = ("baseline", "dsft-cold", "dsft-cold-1", "dsft-warm", "dsft-check", "dsft-resume", "dsft-before")
WORDS = ("the court held that the contract was void because the statute requires a written instrument signed by the "
         "party to be charged and the plaintiff failed to show any exception under section twelve of the act so the "
         "appeal is dismissed with costs liability negligence damages evidence ruling clause tenant landlord lease "
         "easement title deed mortgage lien").split()


def write_rows(path: Path, rows: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as f:
        for _ in range(rows):
            question = " ".join(rng.choice(WORDS) for _ in range(rng.randint(15, 110)))
            answer = " ".join(rng.choice(WORDS) for _ in range(rng.randint(50, 690)))
            f.write(json.dumps({"messages": [{"role": "system", "content": "You are a careful legal assistant."},
                                             {"role": "user", "content": question},
                                             {"role": "assistant", "content": answer}]}) + "\n")


def _peak_rss_gib() -> float:
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / 2**20


def child(case: str, data: Path, cache: Path, before_rows: int) -> dict:
    """One case, in this (child) process; returns its row."""
    os.environ["DSFT_CACHE"] = str(cache)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from dsft.data.keys import file_sha256
    from dsft.data.prepared import Spec, prepare
    from dsft.models.load import load_tokenizer, resolve_model_path

    tokenizer = load_tokenizer(resolve_model_path("builtin:tiny-deepseek-v3"))
    row: dict = {"case": case}
    started = time.perf_counter()
    if case == "baseline":
        tokens = 0
        texts: list[str] = []
        render_s = tokenize_s = 0.0

        def flush() -> None:
            nonlocal tokenize_s, tokens
            t = time.perf_counter()
            tokens += sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])
            tokenize_s += time.perf_counter() - t
            texts.clear()

        rows = 0
        with data.open(encoding="utf-8") as f:
            for line in f:
                messages = json.loads(line)["messages"]
                t = time.perf_counter()
                texts.append(tokenizer.apply_chat_template(messages, tokenize=False))
                render_s += time.perf_counter() - t
                rows += 1
                if len(texts) == 1000:
                    flush()
        if texts:
            flush()
        row.update(rows=rows, tokens=tokens, seconds=render_s + tokenize_s, render_s=render_s, tokenize_s=tokenize_s,
                   note=f"render {render_s:.1f} s + tokenize {tokenize_s:.1f} s (JSON reading not counted)")
    elif case == "dsft-before":
        sys.path.insert(0, str(REPO / "tests"))
        import reference_tokenize

        with data.open(encoding="utf-8") as f:
            conversations = [json.loads(next(f))["messages"] for _ in range(before_rows)]
        started = time.perf_counter()
        out = reference_tokenize.tokenize_all(tokenizer, conversations, None, True)
        row.update(rows=before_rows, tokens=sum(map(len, out["input_ids"])), note=f"first {before_rows:,} rows, in memory")
    elif case == "dsft-check":
        from dsft.data.store import entries, problem

        entry = entries()[0]
        size = (entry / "data.arrow").stat().st_size
        started = time.perf_counter()
        assert problem(entry, full=True) is None
        seconds = time.perf_counter() - started
        meta = json.loads((entry / "meta.json").read_text())
        row.update(rows=meta["rows"], tokens=meta["tokens"], seconds=seconds,
                   note=f"{size / 2**20:.0f} MiB checked at {size / 2**30 / seconds:.2f} GiB/s (page cache warm)")
    else:
        spec = Spec("sft", [str(data)], "messages")
        if case == "dsft-resume":
            file_sha256(data)
        tokens = prepare(spec, tokenizer, num_proc=1 if case == "dsft-cold-1" else None, quiet=True)
        row.update(rows=len(tokens), tokens=tokens.tokens, entry_bytes=(tokens.path / "data.arrow").stat().st_size)
    row.setdefault("seconds", time.perf_counter() - started)
    row["peak_rss_gib"] = _peak_rss_gib()
    return row


def run_case(case: str, data: Path, cache: Path, before_rows: int) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", case, "--data", str(data), "--cache", str(cache),
                           "--before", str(before_rows)], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{case} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    base = next((r for r in rows if r["case"] == "baseline"), None)
    base_rate = base["rows"] / base["seconds"] if base else None
    lines = [f"{'case':<13} {'rows':>10} {'tokens':>13} {'seconds':>9} {'rows/s':>10} {'vs baseline':>12} {'peak RSS':>9}  note"]
    for r in rows:
        rate = r["rows"] / r["seconds"] if r["seconds"] else float("inf")
        ratio = f"{rate / base_rate:.2f}x" if base_rate and r["case"] != "baseline" else ""
        lines.append(f"{r['case']:<13} {r['rows']:>10,} {r['tokens']:>13,} {r['seconds']:>9.2f} {rate:>10,.0f} {ratio:>12} "
                     f"{r['peak_rss_gib']:>7.2f} G  {r.get('note', '')}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--cases", default=",".join(c for c in CASES if c != "dsft-before"))
    parser.add_argument("--before", type=int, default=0, help="rows for the dsft-before case (adds it when > 0)")
    parser.add_argument("--smoke", action="store_true", help="600 rows, every case")
    parser.add_argument("--dir", help="where the data file and the cache go (default: a temporary directory)")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, Path(args.data), Path(args.cache), args.before)))
        return
    if args.smoke:  # every case, in this process (a check of the script: no timing or memory to trust)
        args.rows, args.before, args.cases = 600, 150, ",".join(CASES)
    cases = [c for c in args.cases.split(",") if c]
    if args.before and "dsft-before" not in cases:
        cases.append("dsft-before")
    unknown = set(cases) - set(CASES)
    if unknown:
        raise SystemExit(f"unknown cases {sorted(unknown)}; choose from {', '.join(CASES)}")
    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="dsft-data-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / f"chat-{args.rows}.jsonl"
    if not data.is_file():
        write_rows(data, args.rows)
    cache = work / "cache"
    import shutil

    shutil.rmtree(cache / "data", ignore_errors=True)  # cold means cold
    print(f"{args.rows:,} synthetic chat rows ({data.stat().st_size / 2**20:.0f} MiB JSONL), {os.cpu_count()} cores, "
          f"built-in tokenizer", flush=True)
    rows = []
    for case in cases:
        if case in ("dsft-cold", "dsft-cold-1"):
            shutil.rmtree(cache / "data", ignore_errors=True)
        rows.append(child(case, data, cache, args.before) if args.smoke else run_case(case, data, cache, args.before))
        print(f"  {case}: {rows[-1]['seconds']:.2f} s", flush=True)
    print(table(rows))
    built = next((r for r in rows if r.get("entry_bytes") and r["case"].startswith("dsft-cold")), None)
    if built:
        print(f"cache entry: {built['entry_bytes'] / 2**20:.1f} MiB = {built['entry_bytes'] / (4 * built['tokens']):.3f}x "
              f"the int32 size of its {built['tokens']:,} tokens")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
