"""Write the small legal-domain SFT set used by the tiny recipes.

Each fact is a short definition; training rows ask for it in four phrasings, and the held-out eval
rows ask in a fifth phrasing the model never saw, so eval loss measures whether the fact was learned
rather than the question memorised. Run from the repository root:

    python scripts/make_legal_data.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

FACTS: dict[str, str] = {
    "consideration": "Consideration is something of value that each party gives in exchange for the other's promise; without it most contracts are not enforceable.",
    "an offer": "An offer is a definite proposal to enter a contract on stated terms, which the other party can accept to form a binding agreement.",
    "acceptance": "Acceptance is an unqualified agreement to all the terms of an offer, communicated to the person who made it.",
    "a counteroffer": "A counteroffer rejects the original offer and proposes new terms; the original offer can no longer be accepted.",
    "the mailbox rule": "Under the mailbox rule an acceptance sent by post takes effect when it is dispatched, not when it arrives.",
    "promissory estoppel": "Promissory estoppel makes a promise enforceable without consideration when the other party reasonably relied on it to their detriment.",
    "a breach of contract": "A breach of contract is a failure, without lawful excuse, to perform a duty that the contract requires.",
    "a material breach": "A material breach defeats the main purpose of the contract and lets the other party end it and claim damages.",
    "expectation damages": "Expectation damages put the injured party where they would have been had the contract been performed.",
    "reliance damages": "Reliance damages repay what the injured party spent in reliance on the contract before it was broken.",
    "liquidated damages": "Liquidated damages are a sum fixed in the contract in advance, enforceable if it is a genuine pre-estimate of loss and not a penalty.",
    "specific performance": "Specific performance is a court order to carry out the contract, granted when money would not be an adequate remedy, as with land.",
    "the statute of frauds": "The statute of frauds requires certain contracts, such as sales of land, to be in writing and signed to be enforceable.",
    "the parol evidence rule": "The parol evidence rule bars earlier or oral terms that contradict a final written agreement.",
    "force majeure": "A force majeure clause excuses performance when events beyond the parties' control, such as war or natural disaster, prevent it.",
    "frustration of purpose": "Frustration of purpose discharges a contract when an unforeseen event destroys the reason both parties made it.",
    "duress": "Duress is an improper threat that leaves a party no reasonable choice but to agree, making the contract voidable.",
    "undue influence": "Undue influence is unfair persuasion by someone in a position of trust, and it makes the resulting contract voidable.",
    "misrepresentation": "Misrepresentation is a false statement of fact that induced the other party to contract, allowing rescission.",
    "rescission": "Rescission unwinds a contract and returns the parties to their positions before it was made.",
    "an indemnity clause": "An indemnity clause makes one party pay for specified losses that the other party suffers, including claims by third parties.",
    "a limitation of liability clause": "A limitation of liability clause caps or excludes the damages one party can recover from the other.",
    "a non-compete clause": "A non-compete clause stops a former employee from working for competitors, and courts enforce it only if reasonable in time, area and scope.",
    "a non-disclosure agreement": "A non-disclosure agreement obliges a party to keep specified information confidential and not to use it for other purposes.",
    "an assignment": "An assignment transfers a party's rights under a contract to someone else; duties are transferred by delegation.",
    "a warranty": "A warranty is a promise that a fact about the goods or services is true, and breaching it gives a claim for damages.",
    "a condition precedent": "A condition precedent is an event that must occur before a party's duty to perform arises.",
    "negligence": "Negligence is a failure to take reasonable care that causes foreseeable harm to someone owed a duty of care.",
    "a duty of care": "A duty of care is the legal obligation to avoid acts or omissions that could foreseeably harm others.",
    "causation": "Causation links the breach to the harm: the harm would not have happened but for the breach and was not too remote.",
    "contributory negligence": "Contributory negligence is the claimant's own failure to take care, which reduces the damages they can recover.",
    "vicarious liability": "Vicarious liability makes an employer answer for wrongs that an employee commits in the course of employment.",
    "defamation": "Defamation is a false statement published to others that harms a person's reputation; libel is written and slander is spoken.",
    "a fiduciary duty": "A fiduciary duty requires a person to act loyally in another's best interest and to avoid conflicts of interest.",
    "the business judgment rule": "The business judgment rule protects directors from liability for informed decisions made in good faith.",
    "piercing the corporate veil": "Piercing the corporate veil holds shareholders personally liable when the company was used as a sham or for fraud.",
    "a limited liability company": "A limited liability company shields its members from personal liability for the company's debts.",
    "a statute of limitations": "A statute of limitations sets the time within which a claim must be brought, after which it is barred.",
    "jurisdiction": "Jurisdiction is a court's power to hear a case, over the subject matter and over the parties.",
    "venue": "Venue is the particular court location where a case should be heard among those that have jurisdiction.",
    "summary judgment": "Summary judgment decides a case without trial when there is no genuine dispute of material fact.",
    "discovery": "Discovery is the pre-trial exchange of documents and evidence between the parties to a lawsuit.",
    "attorney-client privilege": "Attorney-client privilege protects confidential communications between a lawyer and a client made to seek legal advice.",
    "hearsay": "Hearsay is an out-of-court statement offered to prove the truth of what it asserts, and it is generally inadmissible.",
    "the burden of proof": "The burden of proof is the duty to prove a claim; in civil cases it is on the balance of probabilities.",
    "an injunction": "An injunction is a court order that requires a party to do something or to stop doing something.",
    "arbitration": "Arbitration is private dispute resolution in which a neutral arbitrator makes a binding decision instead of a court.",
    "mediation": "Mediation is a negotiation helped by a neutral mediator who has no power to impose a decision.",
    "a trademark": "A trademark is a sign that identifies the source of goods or services, protected against confusingly similar use.",
    "copyright": "Copyright protects original works of authorship, such as text and software, from copying without permission.",
    "a patent": "A patent gives its owner the exclusive right to an invention for a limited time, in exchange for public disclosure.",
    "fair use": "Fair use permits limited use of copyrighted work without permission for purposes such as criticism, news and teaching.",
    "a power of attorney": "A power of attorney is a document that authorises one person to act for another in legal or financial matters.",
    "probate": "Probate is the court process that proves a will and oversees the distribution of a deceased person's estate.",
    "an easement": "An easement is a right to use another person's land for a specific purpose, such as a path or a pipe.",
    "adverse possession": "Adverse possession lets a person gain title to land by open, continuous and hostile possession for the statutory period.",
    "a lease": "A lease gives a tenant exclusive possession of property for a term in exchange for rent.",
}

TRAIN_PHRASINGS = [
    "What is {t}?",
    "Define {t}.",
    "Explain {t} in one sentence.",
    "In contract and civil law, what does {t} mean?",
]
EVAL_PHRASING = "Could you briefly describe {t} for a client?"
SYSTEM = "You are a careful legal assistant. Answer concisely and accurately."


def _conversation(question: str, answer: str, with_system: bool) -> dict:
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    if with_system:
        messages.insert(0, {"role": "system", "content": SYSTEM})
    return {"messages": messages}


def build() -> tuple[list[dict], list[dict]]:
    rng = random.Random(0)
    train = [
        _conversation(p.format(t=term), answer, with_system=rng.random() < 0.3)
        for term, answer in FACTS.items()
        for p in TRAIN_PHRASINGS
    ]
    rng.shuffle(train)
    evals = [_conversation(EVAL_PHRASING.format(t=t), a, with_system=False) for t, a in FACTS.items()]
    return train, evals


def build_preferences() -> list[dict]:
    """Preference pairs: the right definition is chosen; another term's definition or a vague
    non-answer is rejected. Half the rows use the conversational form."""
    rng = random.Random(1)
    terms = list(FACTS)
    rows = []
    for i, term in enumerate(terms):
        for phrasing in TRAIN_PHRASINGS[:2]:
            question = phrasing.format(t=term)
            wrong = FACTS[terms[(i + rng.randrange(1, len(terms))) % len(terms)]]
            rejected = wrong if rng.random() < 0.7 else f"That depends on many things; you should ask a lawyer about {term}."
            if rng.random() < 0.5:
                rows.append({"prompt": question, "chosen": FACTS[term], "rejected": rejected})
            else:
                rows.append({"prompt": [{"role": "user", "content": question}],
                             "chosen": [{"role": "assistant", "content": FACTS[term]}],
                             "rejected": [{"role": "assistant", "content": rejected}]})
    rng.shuffle(rows)
    return rows


def _write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


if __name__ == "__main__":
    root = Path(__file__).resolve().parent.parent / "data_templates" / "legal"
    train_rows, eval_rows = build()
    _write(root / "train.jsonl", train_rows)
    _write(root / "eval.jsonl", eval_rows)
    prefs = build_preferences()
    _write(root / "preference.jsonl", prefs)
    print(f"wrote {len(train_rows)} train, {len(eval_rows)} eval and {len(prefs)} preference rows to {root}")
