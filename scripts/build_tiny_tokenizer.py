"""Build the byte-level BPE tokenizer shipped with the built-in tiny models.

It carries DeepSeek's special tokens and the DeepSeek-V3-style chat template from
data_templates/chat_templates/deepseek-v3.jinja. Run from the repository root after editing the
corpus or the template:

    python scripts/build_tiny_tokenizer.py
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "dsft" / "models" / "builtin" / "tokenizer"
BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
SPECIALS = [BOS, EOS, PAD, "<｜User｜>", "<｜Assistant｜>"]
VOCAB_SIZE = 1024


def corpus() -> list[str]:
    texts = []
    for path in sorted((ROOT / "data_templates").rglob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            texts.append(json.dumps(json.loads(line), ensure_ascii=False))
    return texts


def main() -> None:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        additional_special_tokens=SPECIALS[3:], model_max_length=4096,
    )
    fast.chat_template = (ROOT / "data_templates/chat_templates/deepseek-v3.jinja").read_text()
    fast.save_pretrained(OUT)
    print(f"saved {len(fast)} tokens to {OUT}")


if __name__ == "__main__":
    main()
