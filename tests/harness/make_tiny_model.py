#!/usr/bin/env python3
"""Write a tiny random-weight Llama that the CPU build of vLLM serves, with no hub and no torch.

The shapes were measured to work with vLLM's CPU build: hidden 128, 4 heads of 32 (vLLM's CPU attention rejects
head_dim 16), 2 KV heads, 2 layers, a 512-token byte-level BPE tokenizer trained here, and a
chat template, so /v1/chat/completions works. Weights are seeded: the same bytes every time.
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 128, 256, 2, 4, 2, 32, 512
SPECIAL = ["<unk>", "<s>", "</s>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<s>{{ message['role'] }}\n{{ message['content'] }}</s>\n"
    "{% endfor %}{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "vLLM serves large language models behind an OpenAI compatible API.",
    "Ansible turns bare GPU servers into a production service, one idempotent task at a time.",
    "Nginx sits in front as the gateway and streams tokens without buffering.",
    "Hello, how are you today? I am fine, thank you. What can I do for you?",
    "system user assistant: answer briefly and say why in one line.",
]


def bf16_bytes(array: np.ndarray) -> bytes:
    """bfloat16 is the upper half of float32; numpy has no bf16 dtype, so truncate by hand."""
    return (array.astype(np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()


def weights(rng: np.random.Generator) -> dict[str, np.ndarray]:
    def linear(rows: int, cols: int) -> np.ndarray:
        return rng.normal(0.0, 0.02, size=(rows, cols))

    tensors = {"model.embed_tokens.weight": linear(VOCAB, HIDDEN), "model.norm.weight": np.ones(HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        tensors |= {
            p + "input_layernorm.weight": np.ones(HIDDEN),
            p + "post_attention_layernorm.weight": np.ones(HIDDEN),
            p + "self_attn.q_proj.weight": linear(HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.k_proj.weight": linear(KV_HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.v_proj.weight": linear(KV_HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.o_proj.weight": linear(HIDDEN, HEADS * HEAD_DIM),
            p + "mlp.gate_proj.weight": linear(INTERMEDIATE, HIDDEN),
            p + "mlp.up_proj.weight": linear(INTERMEDIATE, HIDDEN),
            p + "mlp.down_proj.weight": linear(HIDDEN, INTERMEDIATE),
        }
    tensors["lm_head.weight"] = linear(VOCAB, HIDDEN)
    return tensors


def write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """The safetensors layout: u64 header length, JSON header, then the raw tensor bytes."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    blobs, offset = [], 0
    for name, array in tensors.items():
        blob = bf16_bytes(array)
        header[name] = {"dtype": "BF16", "shape": list(array.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with path.open("wb") as out:
        out.write(struct.pack("<Q", len(raw)) + raw)
        for blob in blobs:
            out.write(blob)


def train_tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS * 50, trainer=trainer)
    return tokenizer


def main(target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer()
    vocab = tokenizer.get_vocab_size()
    if vocab > VOCAB:
        raise SystemExit(f"tokenizer has {vocab} tokens, the model only {VOCAB}")
    tokenizer.save(str(target / "tokenizer.json"))
    ids = {tok: tokenizer.token_to_id(tok) for tok in SPECIAL}
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "vocab_size": VOCAB,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": ids["<s>"],
        "eos_token_id": ids["</s>"],
        "torch_dtype": "bfloat16",
        "dtype": "bfloat16",
    }
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "model_max_length": 2048,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    files = {
        "config.json": config,
        "generation_config.json": {"bos_token_id": ids["<s>"], "eos_token_id": ids["</s>"]},
        "tokenizer_config.json": tokenizer_config,
        "special_tokens_map.json": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
    }
    for name, content in files.items():
        (target / name).write_text(json.dumps(content, indent=2) + "\n")
    write_safetensors(target / "model.safetensors", weights(np.random.default_rng(0)))
    print(f"wrote {target} ({sum(t.size for t in weights(np.random.default_rng(0)).values())} parameters)")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: make_tiny_model.py TARGET_DIR")
    main(Path(sys.argv[1]))
