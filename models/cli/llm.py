"""``servery llm``: put local Hugging Face models into the store and check LLM configs.

    servery llm import-hf DIR --name NAME [--parameters N] [--quantization Q] [--source TEXT]
                          [--no-progress]
    servery llm validate CONFIG.yaml [--gpu-memory-gib G] [--gpus N]
    servery llm lora add NAME --base BASE PATH | lora list | lora remove NAME[:VERSION]

``import-hf`` copies a Hugging Face model directory (``config.json``, ``*.safetensors``, a
tokenizer) into the store as a new version of NAME (see :mod:`models.llm_store`). Without
``--parameters`` it counts them from the safetensors headers (tensor shapes only, no weights are
read and torch is not imported: :func:`models.llm_config.safetensors_parameters`); pass the real
count for packed 4-bit checkpoints (AWQ/GPTQ), whose headers hold packed int32 words. The copy
shows a progress bar in bytes on a terminal's stderr (:mod:`models.progress`).

``validate`` checks an LLM config file, the one the service reads (``SERVERY_LLM_MODELS_FILE``,
``deploy/components/llm/llm.yaml``), against the store with the service's own schema, defaults
and ``SERVERY_LLM_*`` knobs from the environment (see :mod:`models.llm_config`): every tag is a
stored LLM, ``max_model_len`` fits its context, the engines fit the GPUs and their shares, and
each engine's KV cache holds one full-length sequence by vLLM's accounting
(:mod:`models.llm_memory`), with the concurrency it gives.
Fine: a table, exit 0. Not fine: one line per problem on stderr, exit 2. ``--json`` prints
machine-readable output on stdout instead of text (also with problems; the exit code says which).
It also checks the engine features against vLLM's own lists (:mod:`models.llm_features`) and
each LLM's LoRA adapters (stored, of that base, within ``max_lora_rank`` and ``max_adapters``).

``lora add`` stores a PEFT adapter folder as a new version of NAME, an adapter of BASE
(:mod:`models.llm_lora`); ``servery models promote/rollback`` move its aliases as for any model.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("llm", help="import Hugging Face LLMs, validate LLM configs")
    sub = p.add_subparsers(dest="llm_command", required=True, metavar="ACTION")
    imp = sub.add_parser("import-hf", help="a local Hugging Face model directory, into the store")
    imp.add_argument("dir", help="directory with config.json, *.safetensors and a tokenizer")
    imp.add_argument("--name", required=True, help="store name (a new version is added)")
    imp.add_argument(
        "--parameters", type=int, help="parameter count (default: from the safetensors headers)"
    )
    imp.add_argument("--quantization", help="quantization of the weights (default: none)")
    imp.add_argument("--source", help="where the model came from (default: the directory)")
    imp.add_argument("--json", action="store_true")
    imp.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    val = sub.add_parser("validate", help="check an LLM config: tags, context lengths, memory")
    val.add_argument("config", help="LLM config YAML (see models/llm_config.py)")
    val.add_argument(
        "--gpu-memory-gib",
        type=float,
        help="memory of one GPU as the driver reports it (an H100: 79.6); overrides gpu.memory_gib",
    )
    val.add_argument(
        "--gpus", type=int, help="GPUs of the service (overrides gpu.count, SERVERY_LLM_GPUS)"
    )
    val.add_argument("--json", action="store_true")
    lora = sub.add_parser("lora", help="LoRA adapters in the store (models/llm_lora.py)")
    lsub = lora.add_subparsers(dest="lora_command", required=True, metavar="ACTION")
    add = lsub.add_parser("add", help="a PEFT adapter folder, as a new version of NAME")
    add.add_argument("name", help="the adapter's store name (what clients send as model)")
    add.add_argument("--base", required=True, help="store tag of the LLM it adapts")
    add.add_argument("path", help="folder with adapter_config.json and adapter weights")
    add.add_argument("--source", help="where the adapter came from (default: the folder)")
    add.add_argument("--json", action="store_true")
    lst = lsub.add_parser("list", help="stored adapters: base, rank, versions")
    lst.add_argument("--json", action="store_true")
    rm = lsub.add_parser("remove", help="delete an adapter version (NAME:VERSION) or all (NAME)")
    rm.add_argument("tag")
    rm.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def lora_command(args: argparse.Namespace) -> tuple[Any, str]:
    """``servery llm lora add|list|remove``: the summary (for --json) and its text."""
    import bentoml

    from models.llm_lora import TASK, check_peft_dir, save_adapter, stored
    from models.store import StoreError

    if args.lora_command == "add":
        check_peft_dir(args.path)
        saved = save_adapter(args.name, args.base, args.path, source=args.source)
        meta = dict(saved.info.metadata)
        out = {"tag": str(saved.tag), **meta}
        text = (
            f"{saved.tag}: LoRA rank {meta['rank']} on {meta['base']}:{meta['base_version']} "
            f"({', '.join(meta['target_modules'])})"
        )
        return out, text
    if args.lora_command == "list":
        rows: dict[str, dict[str, Any]] = {}
        for m in bentoml.models.list():
            if m.info.labels.get("task") != TASK:
                continue
            row = rows.setdefault(m.tag.name, {"name": m.tag.name, "versions": []})
            row["versions"].append(m.tag.version)
            row.update(base=m.info.metadata.get("base"), rank=m.info.metadata.get("rank"))
        out = sorted(rows.values(), key=lambda r: r["name"])
        text = "\n".join(
            f"{r['name']}  base {r['base']}  rank {r['rank']}  versions {len(r['versions'])}"
            for r in out
        )
        return out, text or "no LoRA adapters in the store"
    name = args.tag.split(":", 1)[0]
    found = stored(name)
    if found is None or found.info.labels.get("task") != TASK:
        raise StoreError(f"no LoRA adapter named {name!r} in the store")
    tags = [args.tag] if ":" in args.tag else [str(m.tag) for m in bentoml.models.list(name)]
    for tag in tags:
        bentoml.models.delete(tag)
    return {"removed": tags}, f"removed {', '.join(tags)}"


def import_hf(
    path: Path | str,
    name: str,
    *,
    parameters: int | None = None,
    quantization: str | None = None,
    source: str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Save the Hugging Face directory ``path`` as a new version of ``name``; returns a summary.
    ``progress``: a bar of the bytes copied on stderr (where it is a terminal)."""
    from models.llm_config import safetensors_parameters
    from models.llm_store import check_hf_dir, save_hf_dir
    from models.progress import bar, tree_bytes

    path = Path(path).resolve()
    check_hf_dir(path)
    counted = parameters is None
    if parameters is None:
        parameters = safetensors_parameters(path)
    if parameters <= 0:
        raise ValueError(f"--parameters must be positive, not {parameters}")
    with bar(
        total=tree_bytes(path), unit="B", desc=f"copying {path.name}", off=not progress, scale=True
    ) as copied:
        bento_model = save_hf_dir(
            name,
            path,
            source=source or f"local directory {path}",
            parameters=parameters,
            quantization=quantization,
            metadata={"parameters_from": "safetensors headers" if counted else "--parameters"},
            progress=copied,
        )
    meta = bento_model.info.metadata
    return {
        "tag": str(bento_model.tag),
        "parameters": meta["parameters"],
        "parameters_from": meta["parameters_from"],
        "context_length": meta["context_length"],
        "architecture": meta["architecture"],
        "quantization": meta["quantization"],
        "source": meta["source"],
    }


def format_table(estimates: list[dict[str, Any]]) -> str:
    """A plain-text table of :func:`models.llm_memory.estimate` results, one row per LLM."""
    head = ("name", "tag", "dtype", "kv", "len", "seqs", "weights", "budget", "kv cache", "conc.")

    def num(e: dict[str, Any], key: str, fmt: str = "{:.2f}") -> str:
        return fmt.format(e[key]) if key in e else "-"

    rows = [
        (
            e["name"],
            e["tag"],
            e["dtype"] if e["quantization"] == "none" else e["quantization"],
            e["kv_cache_dtype"],
            str(e["max_model_len"]),
            num(e, "max_num_seqs", "{}"),
            f"{e['weights_gib']:.2f}",
            num(e, "budget_gib"),
            num(e, "kv_cache_gib"),
            num(e, "concurrency", "{:.2f}x"),
        )
        for e in estimates
    ]
    widths = [max(len(r[i]) for r in (head, *rows)) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    header = "  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))
    notes = [f"{e['name']}: {note}" for e in estimates for note in e["notes"]]
    return "\n".join([f"{header}  (GiB per GPU)", *lines, *notes])


def _validate(args: argparse.Namespace) -> tuple[int, Any, str]:
    from models.llm_config import ServiceKnobs, check, load_config

    config = load_config(args.config)
    service = ServiceKnobs()  # SERVERY_LLM_* as the service reads them
    problems, estimates = check(
        config, service=service, gpu_memory_gib=args.gpu_memory_gib, gpus=args.gpus
    )
    out = {"ok": not problems, "problems": problems, "llms": estimates, "tasks": config.tasks}
    if problems:
        return 2, out, "\n".join(f"servery llm validate: {p}" for p in problems)
    lines = [format_table(estimates)]
    lines += [
        f"{e['name']}: adapters {', '.join(e['adapters'])}" for e in estimates if e["adapters"]
    ]
    if config.tasks:
        lines.append("tasks: " + ", ".join(f"{t} -> {m}" for t, m in config.tasks.items()))
    lines.append(f"{args.config}: OK, {len(estimates)} LLM(s) fit")
    return 0, out, "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from models.llm_config import LLMConfigError
    from models.store import StoreError

    try:
        if args.llm_command == "import-hf":
            out = import_hf(
                args.dir,
                args.name,
                parameters=args.parameters,
                quantization=args.quantization,
                source=args.source,
                progress=not args.no_progress,
            )
            text = (
                f"{out['tag']}: {out['architecture']}, {out['parameters']:,} parameters "
                f"({out['parameters_from']}), context {out['context_length']}, "
                f"quantization {out['quantization']}"
            )
            code = 0
        elif args.llm_command == "lora":
            out, text = lora_command(args)
            code = 0
        else:
            code, out, text = _validate(args)
    except (StoreError, LLMConfigError, ValueError) as e:
        print(f"servery llm {args.llm_command}: {e}", file=sys.stderr)
        return 2
    if args.json:  # on stdout even with problems: scripts read it and check the exit code
        print(json.dumps(out, indent=2))
    else:
        print(text, file=sys.stdout if code == 0 else sys.stderr)
    return code
