"""Tiny MAC models shared by the generation, recall and serving tests: built in the test, never downloaded."""

from pathlib import Path

import torch
from titans_distil.models.configuration_mac_llama import MACLlamaConfig
from titans_distil.models.modeling_mac_llama import MACLlamaForCausalLM
from transformers import AutoTokenizer

from titans_distil.model_folder import save_with_model_code

TINY_MAC = dict(
    vocab_size=49152,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
    segment_len=16,
    memory_chunk_size=4,
    num_persistent_tokens=4,
    memory_layers=[1],
)


def tiny_mac(seed=0, gate_std=1.0, persistent_std=None, **overrides) -> MACLlamaForCausalLM:
    """A tiny MAC model (TINY_MAC with `overrides`) whose read-out gates are opened (so the memory changes the
    logits); `persistent_std` also redraws the persistent tokens, larger than their near-null
    initialisation."""
    torch.manual_seed(seed)
    model = MACLlamaForCausalLM(MACLlamaConfig(**dict(TINY_MAC, **overrides))).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            if layer.memory_gate is not None:
                layer.memory_gate.normal_(0.0, gate_std)
                if persistent_std is not None:
                    layer.persistent_tokens.normal_(0.0, persistent_std)
    return model


def save_mac_folder(model, tokenizer_dir, out: Path) -> Path:
    """A trust_remote_code MAC folder like export_mac_model.py writes (config auto_map + model files)."""
    save_with_model_code(model, out)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out
