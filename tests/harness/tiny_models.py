"""Tiny transformers models built from configs (random init, nothing downloaded), shared by the tests."""

from __future__ import annotations

import transformers

VOCAB = 256


def tiny_llama(positions: int = 64, vocab: int = VOCAB):
    cfg = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
        max_position_embeddings=positions,
        attn_implementation="eager",
    )
    return transformers.LlamaForCausalLM(cfg)


def tiny_gpt2(positions: int = 64, vocab: int = VOCAB):
    cfg = transformers.GPT2Config(
        n_embd=64, n_layer=2, n_head=4, vocab_size=vocab, n_positions=positions, attn_implementation="eager"
    )
    return transformers.GPT2LMHeadModel(cfg)


def tiny_bert(positions: int = 64, vocab: int = VOCAB):
    cfg = transformers.BertConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        vocab_size=vocab,
        max_position_embeddings=positions,
        attn_implementation="eager",
    )
    return transformers.BertForMaskedLM(cfg)


def tiny_t5(vocab: int = VOCAB):
    cfg = transformers.T5Config(
        d_model=64,
        d_ff=128,
        num_layers=2,
        num_heads=4,
        d_kv=16,
        vocab_size=vocab,
        decoder_start_token_id=0,
        attn_implementation="eager",
    )
    return transformers.T5ForConditionalGeneration(cfg)
