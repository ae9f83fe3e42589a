"""An example GRPO reward of your own, as `recipes/legal-grpo.yaml` uses it:

    grpo:
      rewards:
        - function: data_templates/rewards/legal.py:cites_statute

dsft calls it as TRL calls a reward: `cites_statute(prompts=..., completions=..., completion_ids=..., **fields)`,
every other field of the prompt rows by name (here `statute` and `answer` of data_templates/legal/prompts.jsonl),
plus TRL's `trainer_state`, `log_extra` and `log_metric`, which **kwargs takes. For rows whose `prompt` is a
string, `prompts` and `completions` are strings; for rows given as messages, each completion is
`[{"role": "assistant", "content": TEXT}]` (TRL's shapes). Return one float per completion, or None where the
reward does not apply (the row has no statute). It runs in a process of its own with copies of the arguments
and at most `grpo.reward_timeout` seconds per call (docs/objectives.md).
"""

import re

CITATION = re.compile(r"(\d+)\s*U\.?\s*S\.?\s*C\.?\s*§+\s*(\d+[a-z]?)")


def cites_statute(prompts, completions, statute, **kwargs):
    """1.0 when the completion cites the row's statute (`29 U.S.C. § 206`), 0.5 when it cites another section
    of the U.S. Code, 0.0 when it cites none; None for a row without a statute."""
    scores = []
    for completion, expected in zip(completions, statute):
        if not expected:
            scores.append(None)
            continue
        text = completion if isinstance(completion, str) else completion[-1]["content"]
        cited = {f"{title} U.S.C. § {section}" for title, section in CITATION.findall(text)}
        scores.append(1.0 if expected in cited else 0.5 if cited else 0.0)
    return scores
