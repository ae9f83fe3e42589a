"""Write the prompt rows `dsft grpo` recipes train on: data_templates/legal/prompts.jsonl (federal statutes
asked two ways; `answer` is the section number, `statute` the citation) and data_templates/arithmetic/
{train,eval}.jsonl (seeded word problems; `answer` is the number). Run from the repository root:

    python scripts/make_prompt_data.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

FACTS = [
    ("the exclusive rights of a copyright owner", "17", "106"), ("fair use of a copyrighted work", "17", "107"),
    ("the duration of copyright in works created on or after January 1, 1978", "17", "302"),
    ("patentable subject matter", "35", "101"), ("novelty as a condition for patentability", "35", "102"),
    ("non-obvious subject matter as a condition for patentability", "35", "103"), ("the term of a patent", "35", "154"),
    ("contracts in restraint of trade (the Sherman Act)", "15", "1"), ("monopolization (the Sherman Act)", "15", "2"),
    ("false designations of origin and false advertising (the Lanham Act)", "15", "1125"),
    ("civil actions for deprivation of rights under color of state law", "42", "1983"),
    ("federal-question jurisdiction of the district courts", "28", "1331"), ("diversity jurisdiction", "28", "1332"),
    ("venue in civil actions", "28", "1391"), ("removal of civil actions from state court", "28", "1441"),
    ("mail fraud", "18", "1341"), ("wire fraud", "18", "1343"), ("fraud in connection with computers", "18", "1030"),
    ("the automatic stay in bankruptcy", "11", "362"), ("the discharge of a chapter 7 debtor", "11", "727"),
    ("maximum hours and overtime pay (the Fair Labor Standards Act)", "29", "207"),
    ("the minimum wage (the Fair Labor Standards Act)", "29", "206"),
    ("the creation of a trademark register (principal register)", "15", "1051"),
    ("declaratory judgments", "28", "2201"), ("the supplemental jurisdiction of the district courts", "28", "1367"),
]
FORMS = ["Which section of title {t} of the U.S. Code governs {what}? Cite it as '{t} U.S.C. § N' and end with 'Answer: N'.",
         "A client asks which federal statute covers {what}. Give the citation ({t} U.S.C. § N) and finish with 'Answer: N'."]
NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana", "Ivan", "Jia"]
ITEMS = ["apples", "books", "pencils", "tickets", "marbles", "coins", "stamps", "cards"]


def legal() -> list[dict]:
    rows = [{"prompt": f.format(t=t, what=what), "answer": sec, "statute": f"{t} U.S.C. § {sec}"}
            for what, t, sec in FACTS for f in FORMS]
    random.Random(0).shuffle(rows)
    return rows


def problem(rng: random.Random) -> dict:
    kind, n = rng.randrange(4), rng.choice(NAMES)
    m, it = rng.choice([x for x in NAMES if x != n]), rng.choice(ITEMS)
    a, b, c = rng.randint(2, 60), rng.randint(2, 40), rng.randint(2, 9)
    if kind == 0:
        q, answer = f"{n} has {a} {it} and buys {b} more. How many {it} does {n} have now?", a + b
    elif kind == 1:
        q, answer = f"{n} had {a + b} {it} and gave {b} to {m}. How many {it} does {n} have left?", a
    elif kind == 2:
        q, answer = f"{n} buys {c} boxes with {b} {it} in each box. How many {it} is that in total?", b * c
    else:
        q, answer = f"{n} shares {b * c} {it} equally among {c} friends. How many {it} does each friend get?", b
    return {"prompt": q + " Think it through, then put the final number in \\boxed{}.", "answer": str(answer)}


def write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def main() -> None:
    write(Path("data_templates/legal/prompts.jsonl"), legal())
    rng = random.Random(1234)
    for name, count in (("train", 200), ("eval", 40)):
        write(Path(f"data_templates/arithmetic/{name}.jsonl"), [problem(rng) for _ in range(count)])


if __name__ == "__main__":
    main()
