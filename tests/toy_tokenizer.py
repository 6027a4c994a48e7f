"""A byte-level toy tokenizer with the small part of the transformers tokenizer API lorakit's data code uses."""

from __future__ import annotations


class ByteTokenizer:
    """Each UTF-8 byte -> id 3 + byte % 125 (ids below the tiny test models' vocab of 128); 0 pad, 1 bos, 2 eos."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2
    eos_token = "</s>"

    def __init__(self, chat_template: str | None = None, add_bos: bool = True) -> None:
        self.chat_template = chat_template
        self.add_bos = add_bos  # False: like GPT-2's and SmolLM2's tokenizers, which add no BOS

    def encode(self, text: str) -> list[int]:
        return [3 + b % 125 for b in text.encode()]

    def __call__(self, text, text_pair=None, add_special_tokens=True, truncation=False, max_length=None):
        ids = ([self.bos_token_id] if add_special_tokens and self.add_bos else []) + self.encode(text)
        if text_pair is not None:
            ids += [self.eos_token_id] + self.encode(text_pair)
        if truncation and max_length:
            ids = ids[:max_length]
        return {"input_ids": ids}

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        text = "".join(f"<{m['role']}>{m['content']}" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids)
