"""Quick start: LoRA on the bundled SmolLM2-135M — inject, train a few steps, save, merge.

Run: .venv/bin/python examples/quickstart.py  (after `make setup`)
"""

import tempfile
from pathlib import Path

import torch

import lorakit
from lorakit.models import load_model

model, tok = load_model("smollm2-135m")
lorakit.inject(model, lorakit.LoraConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"]))
print(lorakit.summary(model))

batch = tok(["name[The Vaults], eatType[pub] -> The Vaults is a pub."], return_tensors="pt")
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
for step in range(3):
    loss = model(**batch, labels=batch.input_ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    print(f"step {step}: loss {loss.item():.3f}")

with tempfile.TemporaryDirectory() as out:
    lorakit.save_adapter(model, out)
    print("adapter saved:", sorted(p.name for p in Path(out).iterdir()))

plain = lorakit.merge_and_unload(model)  # plain LlamaForCausalLM, ΔW folded in
print(type(plain.model.layers[0].self_attn.q_proj).__name__)
