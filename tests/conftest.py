"""Tiny random transformers models (LLaMA, GPT-2, BERT) built in the tests: no network, no files."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def _one_thread(request: pytest.FixtureRequest):
    """One intra-op thread for tiny-model tests: ~3x faster on the shared 2-core machine (no spinning threads
    competing with other jobs; whole suite 97 s -> 32 s, 88 -> 26 s of CPU). Real-model (slow) tests keep theirs."""
    threads = torch.get_num_threads()
    if request.node.get_closest_marker("slow") is None:
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_llama(seed: int = 0, vocab: int = 128, layers: int = 2, tie: bool = False) -> torch.nn.Module:
    """A 2-layer LLaMA (GQA: 4 query heads, 2 key/value heads), fp32, eval mode; `tie`: lm_head is the embedding."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=tie,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie
    return model


def tiny_gpt2(seed: int = 0, vocab: int = 128, layers: int = 2) -> torch.nn.Module:
    """A 2-layer GPT-2 (fused c_attn as transformers' Conv1D), dropout off, eval mode."""
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        vocab_size=vocab, n_embd=32, n_layer=layers, n_head=4, n_positions=64,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2,
    )
    return transformers.GPT2LMHeadModel(cfg).eval()


def tiny_bert(seed: int = 0, vocab: int = 128, layers: int = 2, num_labels: int = 3) -> torch.nn.Module:
    """A 2-layer BERT with a sequence-classification head, dropout off, eval mode."""
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(
        vocab_size=vocab, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, num_labels=num_labels,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return transformers.BertForSequenceClassification(cfg).eval()


BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}


@pytest.fixture
def input_ids() -> torch.Tensor:
    """A fixed (2, 9) batch of token ids below the tiny models' vocabulary size."""
    return torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(1))


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The model's logits without grad."""
    with torch.no_grad():
        return model(ids).logits


CHARS = "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'-()" + "".join(
    chr(c) for c in range(0x400, 0x400 + 51)
)  # Cyrillic letters fill the tiny model's vocabulary of 128, so every generated id decodes to one character


def char_tokenizer():
    """A character-level `PreTrainedTokenizerFast` (ids 0..127): <pad>=0, <s>=1, </s>=2, <unk>=3."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{c: i + 4 for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def assert_rounded_once(merged: torch.Tensor, exact: torch.Tensor) -> None:
    """`merged` (fp16/bf16) is `exact` (fp64 W0 + ΔW) computed in fp32 and rounded to its dtype once: within half a
    unit in the last place of its dtype (plus fp32's own round-off), never the error of two roundings in that dtype."""
    info = torch.finfo(merged.dtype)
    err = (merged.double() - exact).abs()
    bound = exact.abs() * (info.eps / 2 + 2 * torch.finfo(torch.float32).eps) + info.smallest_normal * info.eps
    assert (err <= bound).all(), f"max error {err.max().item():.3g} exceeds half an ulp"
    assert (exact - exact.to(merged.dtype).double()).abs().max() > 0  # the values do need rounding
