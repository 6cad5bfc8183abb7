"""A tiny Llama-architecture LLM for tests, built locally in seconds (no download).

    python -m training.tiny_llm [--name tiny-llm] [--seed 0] [--force]

A randomly initialised ``LlamaForCausalLM`` (hidden 128, 2 layers, 4 heads, 2 KV heads,
1,024-token context, ~1.3 M parameters) and a byte-level BPE tokenizer trained here with
``tokenizers`` on the dataset descriptions that ship with scikit-learn, plus a ChatML-style chat
template, saved as a Hugging Face directory into the model store (``models/llm_store.py``). Its
text is gibberish by design: tests check the protocol (streaming, stop sequences, ``n``, seeds,
usage, errors), not the prose; ``training/smollm2.py`` provides real text.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

NAME = "tiny-llm"
VOCAB = 4096
CONTEXT = 1024
ARCH = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def corpus() -> list[str]:
    """English text available offline: scikit-learn's dataset descriptions, line by line."""
    from sklearn import datasets

    texts = []
    for loader in (
        datasets.load_iris,
        datasets.load_digits,
        datasets.load_breast_cancer,
        datasets.load_wine,
        datasets.load_diabetes,
        datasets.load_linnerud,
    ):
        texts += [line for line in loader().DESCR.splitlines() if line.strip()]
    texts += ["The capital of France is Paris.", "Hello! How can I help you today?"]
    return texts


def build(out: Path | str, seed: int = 0) -> dict[str, Any]:
    """Write the tiny model's Hugging Face directory to ``out``; returns facts for the store."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|pad|>",
        model_max_length=CONTEXT,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(out)

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=CONTEXT,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        torch_dtype="float32",
        **ARCH,
    )
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(out, safe_serialization=True)
    model.generation_config.save_pretrained(out)
    return {"parameters": sum(p.numel() for p in model.parameters()), "seed": seed}


def save(name: str = NAME, seed: int = 0) -> Any:
    """Build the tiny model and save it as a new version of ``name``; returns the stored model."""
    from models.llm_store import save_hf_dir

    with tempfile.TemporaryDirectory(prefix="servery-tiny-llm-") as tmp:
        facts = build(tmp, seed)
        return save_hf_dir(
            name,
            tmp,
            source=f"training/tiny_llm.py (random init, seed {seed})",
            parameters=facts["parameters"],
            metadata={"seed": seed, "purpose": "tests"},
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default=NAME)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="save a new version even if present")
    args = parser.parse_args(argv)
    from models.store import StoreError, get_model

    if not args.force:
        try:
            print(f"{args.name}: already in the model store ({get_model(args.name).tag})")
            return 0
        except StoreError:
            pass
    start = time.perf_counter()
    saved = save(args.name, args.seed)
    print(f"{args.name}: saved {saved.tag} in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
