"""Load dsft exports exactly as a user would, with stock transformers and PEFT and no dsft import (run as a
script by test_export_peft.py): for each job, the logits on the given ids and PEFT's config after loading."""

from __future__ import annotations

import ast
import json
import re
import sys
import warnings

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM


def main(jobs_file: str) -> None:
    jobs = json.loads(open(jobs_file).read())
    ids = torch.tensor(jobs["ids"])
    out = {}
    for name, job in jobs["exports"].items():
        try:
            base = AutoModelForCausalLM.from_pretrained(job["base"], dtype=torch.float32)
        except Exception as e:  # noqa: BLE001 - a load the printed recipe says not to do may fail
            if not job.get("may_fail"):
                raise
            out[name] = {"failed": f"{type(e).__name__}: {e}"}
            continue
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = PeftModel.from_pretrained(base, job["adapter"])
        unmatched = set()
        for w in caught:
            found = re.search(r"keys did not match any targeted module and were ignored: (\[.*\])", str(w.message))
            if found:
                unmatched |= set(ast.literal_eval(found.group(1)))
        model.eval()
        with torch.no_grad():
            logits = model(ids).logits
        config = model.peft_config["default"]
        out[name] = {"logits": logits, "unmatched_pattern_keys": sorted(unmatched),
                     "config": {"target_modules": sorted(config.target_modules or ()),
                                "target_parameters": sorted(config.target_parameters or ()),
                                "rank_pattern": dict(config.rank_pattern or {}),
                                "alpha_pattern": dict(config.alpha_pattern or {}),
                                "wrapped_modules": sorted(set(model.base_model.targeted_module_names)
                                                          - set(model.base_model.targeted_parameter_names))}}
    torch.save(out, jobs["out"])
    assert not any(m.startswith("dsft") for m in sys.modules), "dsft was imported"


if __name__ == "__main__":
    main(sys.argv[1])
