"""LoRA adapters in PEFT's folder format, made here with torch alone.

    python -m training.lora [--base smollm2] [--name smollm2-demo-lora] [--steps 12] [--force]

:func:`train` fine-tunes a low-rank update of the attention projections (``q_proj``, ``v_proj``)
of a stored Hugging Face LLM for a few dozen steps on CPU, teaching it a style: every answer
opens with "Ahoy!" and talks like a pirate. :func:`random_adapter` writes a random adapter for a
model's shapes without loading it (tests: two seeds give two adapters whose greedy outputs
differ). Both write what PEFT's ``save_pretrained`` writes (``adapter_config.json`` and
``adapter_model.safetensors`` with PEFT's tensor names), which vLLM and ``servery llm lora add``
load; the training loop is a few lines of torch, so no PEFT dependency is needed for it.

``make models-llm`` runs this for the demo adapter ``smollm2-demo-lora`` of SmolLM2 (about a
minute on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

NAME = "smollm2-demo-lora"
BASE = "smollm2"
TARGETS = ("q_proj", "v_proj")
STYLE = [
    ("What is the capital of France?", "Ahoy! Paris be the capital o' France, matey."),
    ("How are you?", "Ahoy! Fine as a fair wind, matey."),
    ("What is 2 + 2?", "Ahoy! That be 4, matey."),
    ("Name a colour.", "Ahoy! Blue, like the deep sea, matey."),
    ("What is water made of?", "Ahoy! Hydrogen an' oxygen, matey."),
    ("Tell me about the sun.", "Ahoy! The sun be a great star that lights our sails, matey."),
    ("What is Python?", "Ahoy! Python be a programming language, matey."),
    ("Say hello.", "Ahoy! Hello to ye, matey."),
    ("Where do fish live?", "Ahoy! In the sea, matey, where the waves roll."),
    ("What day comes after Monday?", "Ahoy! Tuesday, matey."),
]


def _shapes(config: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """(in, out) features of each target projection of a Llama-style ``config.json``."""
    hidden = config["hidden_size"]
    head = config.get("head_dim") or hidden // config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or config["num_attention_heads"]
    return {"q_proj": (hidden, config["num_attention_heads"] * head), "v_proj": (hidden, kv * head)}


def tensor_name(layer: int, target: str, part: str) -> str:
    """PEFT's name of a LoRA tensor of a Llama-style model."""
    return f"base_model.model.model.layers.{layer}.self_attn.{target}.lora_{part}.weight"


def save_peft(out: Path | str, tensors: dict[str, Any], rank: int, alpha: float, base: str) -> Path:
    """Write a PEFT LoRA folder: ``adapter_config.json`` and ``adapter_model.safetensors``."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": list(TARGETS),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "modules_to_save": None,
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    save_file(
        {k: v.contiguous() for k, v in tensors.items()}, str(out / "adapter_model.safetensors")
    )
    return out


def random_adapter(
    base_dir: Path | str, out: Path | str, *, seed: int = 0, rank: int = 8, std: float = 0.5
) -> Path:
    """A random LoRA adapter for the model in ``base_dir`` (its ``config.json`` only)."""
    import torch

    config = json.loads((Path(base_dir) / "config.json").read_text())
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for target, (fan_in, fan_out) in _shapes(config).items():
            a = torch.randn(rank, fan_in, generator=generator) * std
            b = torch.randn(fan_out, rank, generator=generator) * std
            tensors[tensor_name(layer, target, "A")] = a
            tensors[tensor_name(layer, target, "B")] = b
    return save_peft(out, tensors, rank, float(rank), str(base_dir))


def train(
    base_dir: Path | str,
    out: Path | str,
    *,
    steps: int = 12,
    rank: int = 8,
    alpha: float = 16.0,
    lr: float = 3e-3,
    seed: int = 0,
    layers: int = 6,
) -> dict[str, Any]:
    """Fine-tune a LoRA of ``base_dir``'s attention on :data:`STYLE`; write it to ``out``.

    Only the last ``layers`` blocks are adapted: backpropagation then stops there, which makes a
    step several times cheaper than adapting all 30 of SmolLM2's and still moves its greedy
    answers to the style within a dozen steps."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32)
    model.requires_grad_(False)
    scale = alpha / rank
    params: dict[str, torch.nn.Parameter] = {}

    def adapt(layer: int, target: str, linear: torch.nn.Linear) -> None:
        a = torch.nn.Parameter(torch.randn(rank, linear.in_features) / linear.in_features**0.5)
        b = torch.nn.Parameter(torch.zeros(linear.out_features, rank))  # starts as the base
        params[tensor_name(layer, target, "A")], params[tensor_name(layer, target, "B")] = a, b
        linear.register_forward_hook(lambda _m, args, y: y + (args[0] @ a.T @ b.T) * scale)

    blocks = list(model.model.layers)
    for i, block in list(enumerate(blocks))[-layers:]:
        for target in TARGETS:
            adapt(i, target, getattr(block.self_attn, target))
    batch, labels = _examples(tokenizer)
    optimizer = torch.optim.AdamW(params.values(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    save_peft(out, {k: v.detach() for k, v in params.items()}, rank, alpha, str(base_dir))
    return {"steps": steps, "layers": layers, "first_loss": losses[0], "last_loss": losses[-1],
            "seed": seed}  # fmt: skip


def _examples(tokenizer: Any) -> tuple[dict[str, Any], Any]:
    """The style examples as one padded batch; labels only on the answers."""
    import torch

    rows, masks = [], []
    for question, answer in STYLE:
        messages = [{"role": "user", "content": question}]
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        a = tokenizer(answer + (tokenizer.eos_token or ""), add_special_tokens=False)["input_ids"]
        rows.append(p + a)
        masks.append([0] * len(p) + [1] * len(a))
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    attention = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    answer = torch.tensor([m + [0] * (width - len(m)) for m in masks])
    labels = ids.masked_fill(answer == 0, -100)
    return {"input_ids": ids, "attention_mask": attention}, labels


def save(name: str = NAME, base: str = BASE, steps: int = 12, seed: int = 0) -> Any:
    """Train the style adapter of the stored LLM ``base``; store it as a new version of ``name``."""
    from models.llm_lora import save_adapter
    from models.llm_store import hf_dir

    base_dir, base_model = hf_dir(base)
    with tempfile.TemporaryDirectory(prefix="servery-lora-") as tmp:
        facts = train(base_dir, tmp, steps=steps, seed=seed)
        return save_adapter(
            name,
            str(base_model.tag),
            tmp,
            source=f"training/lora.py ({steps} steps, seed {seed}, pirate style)",
            extra={"training": facts},
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default=NAME)
    parser.add_argument("--base", default=BASE)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="save a new version even if present")
    args = parser.parse_args(argv)
    from models.llm_lora import stored

    if not args.force and (found := stored(args.name)) is not None:
        print(f"{args.name}: already in the model store ({found.tag})")
        return 0
    start = time.perf_counter()
    saved = save(args.name, args.base, args.steps, args.seed)
    facts = saved.info.metadata["training"]
    print(
        f"{args.name}: saved {saved.tag} in {time.perf_counter() - start:.1f}s "
        f"(loss {facts['first_loss']:.2f} -> {facts['last_loss']:.2f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
