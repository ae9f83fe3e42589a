"""Load dsft exports exactly as a user would, with stock transformers and PEFT and no dsft import (run as a
script by test_export_peft.py): for each job, the logits on the given ids and PEFT's config after loading."""

from __future__ import annotations

import json
import sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM


def main(jobs_file: str) -> None:
    jobs = json.loads(open(jobs_file).read())
    ids = torch.tensor(jobs["ids"])
    out = {}
    for name, job in jobs["exports"].items():
        base = AutoModelForCausalLM.from_pretrained(job["base"], dtype=torch.float32)
        model = PeftModel.from_pretrained(base, job["adapter"])
        model.eval()
        with torch.no_grad():
            logits = model(ids).logits
        config = model.peft_config["default"]
        out[name] = {"logits": logits,
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
