"""Build a tiny random Llama with a small byte-level BPE tokenizer, for tests and the CI vLLM server.

Labels A..Z are single tokens (byte-level BPE keeps every byte as a base token). The chat
template is ChatML, as SmolLM2 uses.

Usage: python tests/tiny_model.py OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "You are a movie recommender. Rank the candidates for this user.",
    "User who has watched movies. Favourite genres: Drama, Comedy, Action, Thriller, Romance, Sci-Fi.",
    "Recently watched, newest first: Toy Story (1995) Heat (1995) The American President (1995) Se7en (1995).",
    "Candidates: (A) (B) (C) (D) (E) (F) (G) (H) (I) (J) (K) (L) (M) (N) (O) (P) (Q) (R) (S) (T)",
    "Answer with the letter of the best candidate. Explain why these picks fit the user.",
] * 20


def build_tiny_llama(out_dir: str | Path, *, seed: int = 0, hidden: int = 64, layers: int = 2, vocab: int = 400) -> Path:
    """Write a random `LlamaForCausalLM` and its tokenizer to `out_dir`; return the directory."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
        pad_token="<|endoftext|>", unk_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(fast), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        # head_dim 32: vLLM's CPU attention supports 32, 64, 80, ... but not 16.
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        # Larger-than-default init so label log-probs differ visibly between prompts.
        for param in model.parameters():
            param.normal_(0, 0.2) if param.dim() > 1 else None
    model.save_pretrained(out, safe_serialization=True)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    print(build_tiny_llama(sys.argv[1]))
