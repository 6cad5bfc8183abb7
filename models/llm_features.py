"""The per-LLM engine features of the LLM config and vLLM's own choices for each of them.

An LLM entry may turn on tool calling (``enable_auto_tool_choice``, ``tool_call_parser``,
``tool_parser_plugin``), a ``reasoning_parser``, a ``chat_template``, a
``structured_outputs_backend``, ``enable_prefix_caching``, a ``quantization`` method and LoRA
adapters (``adapters``, ``max_loras``, ``max_lora_rank``, ``max_cpu_loras``);
:mod:`models.llm_config` holds the fields, ``services/llm/settings.py`` makes them vLLM flags.

What names vLLM accepts is read from the installed vLLM's source files with :mod:`ast`, never by
importing vLLM: importing its parser registries imports torch (15 s on 2 cores), and
``servery llm validate`` and the service's settings (read before any engine starts) must stay
cheap. :func:`vllm_choices` finds each list where vLLM 0.32 defines it; a unit test compares them
with vLLM's registries imported for real, so an upgrade that moves one fails there. Where vLLM is
not installed the names are not checked (None).

:func:`feature_problems` is the one check of these fields, run by ``servery llm validate`` and by
the service's settings at start: an unknown parser, backend or method is a config error naming the
valid ones.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# Where vLLM 0.32 defines each list: (file under the vllm package, name, how it is written).
SOURCES = {
    "tool_call_parser": ("tool_parsers/__init__.py", "_TOOL_PARSERS_TO_REGISTER", "dict"),
    "reasoning_parser": ("reasoning/__init__.py", "_REASONING_PARSERS_TO_REGISTER", "dict"),
    "structured_outputs_backend": (
        "config/structured_outputs.py",
        "StructuredOutputsBackend",
        "literal",
    ),
    "tool_strict_level": ("tool_parsers/tool_strict_level.py", "ToolStrictLevelName", "literal"),
    "quantization": (
        "model_executor/layers/quantization/__init__.py",
        "QuantizationMethods",
        "literal",
    ),
    "max_lora_rank": ("config/lora.py", "MaxLoRARanks", "literal"),
}


def vllm_root() -> Path | None:
    """The installed ``vllm`` package's directory (found without importing it), or None."""
    try:
        spec = importlib.util.find_spec("vllm")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _assigned(tree: ast.Module, name: str) -> ast.expr | None:
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == name for t in node.targets
        ):
            return node.value
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if node.target.id == name and node.value is not None:
                return node.value
    return None


def read_choices(path: Path, name: str, kind: str) -> tuple[Any, ...]:
    """The keys of dict ``name`` or the members of ``name = Literal[...]`` in ``path``."""
    value = _assigned(ast.parse(path.read_text()), name)
    if kind == "dict" and isinstance(value, ast.Dict):
        return tuple(ast.literal_eval(k) for k in value.keys if k is not None)
    if kind == "literal" and isinstance(value, ast.Subscript):
        members = value.slice.elts if isinstance(value.slice, ast.Tuple) else [value.slice]
        return tuple(ast.literal_eval(m) for m in members)
    raise LookupError(f"{path}: no {kind} named {name} (has vLLM's layout changed?)")


@functools.cache
def vllm_choices(root: Path | None = None) -> dict[str, tuple[Any, ...]] | None:
    """Each feature's valid values in the installed vLLM; None where vLLM is not installed."""
    root = root or vllm_root()
    if root is None:
        return None
    return {
        feature: read_choices(root / file, name, kind)
        for feature, (file, name, kind) in SOURCES.items()
    }


def plugin_names(path: Path | str) -> tuple[str, ...]:
    """Tool parser names a ``tool_parser_plugin`` file registers: the string arguments of its
    ``register_module(...)`` / ``register_lazy_module(...)`` calls (``name=`` or first)."""
    names: list[str] = []
    for node in ast.walk(ast.parse(Path(path).read_text())):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        if called not in ("register_module", "register_lazy_module"):
            continue
        args = [kw.value for kw in node.keywords if kw.arg == "name"] or node.args[:1]
        for arg in args:
            value = ast.literal_eval(arg) if isinstance(arg, ast.Constant | ast.List) else None
            names += [value] if isinstance(value, str) else list(value or ())
    return tuple(n for n in names if isinstance(n, str))


def is_inline_template(template: str) -> bool:
    """vLLM's own rule (``renderers/chat_utils.py`` ``validate_chat_template``): a chat template
    with ``{``, ``}`` or a newline is Jinja text; anything else names a file."""
    return any(c in template for c in "{}\n")


def template_path(template: str, model_dir: Path) -> Path:
    """The file a non-inline ``chat_template`` names: relative to the stored model version's
    Hugging Face directory (so the template travels with the version), never outside it."""
    relative = Path(template)
    if relative.is_absolute() or ".." in relative.parts:
        raise ValueError(
            f"chat_template {template!r} must name a file inside the model's version folder"
        )
    return model_dir / relative


def check_template(template: str, model_dir: Path | None) -> str | None:
    """A problem with ``chat_template`` (Jinja syntax, a file missing from the version), or None."""
    import jinja2
    import jinja2.sandbox

    if is_inline_template(template):
        text = template
    elif model_dir is None:
        return None
    else:
        try:
            text = template_path(template, model_dir).read_text()
        except ValueError as e:
            return str(e)
        except OSError:
            names = sorted(p.name for p in model_dir.iterdir())
            return f"chat_template file {template!r} is not in the model's version ({names})"
    try:
        jinja2.sandbox.ImmutableSandboxedEnvironment().parse(text)
    except jinja2.TemplateSyntaxError as e:
        return f"chat_template is not valid Jinja: {e.message} (line {e.lineno})"
    return None


def _unknown(field: str, value: Any, valid: tuple[Any, ...], extra: str = "") -> str:
    listed = ", ".join(str(v) for v in sorted(valid, key=str))
    return f"{field} {value!r} is not one of vLLM's: {listed}{extra}"


def feature_problems(
    knobs: Any, model_dir: Path | None = None, choices: Mapping[str, tuple[Any, ...]] | None = None
) -> list[str]:
    """What vLLM would refuse in one LLM's resolved knobs (:func:`models.llm_config.resolve`).

    ``model_dir``: the stored version's Hugging Face directory, to find a chat template file (None:
    not looked for). ``choices``: vLLM's lists (default: the installed vLLM's, None if absent).
    """
    if choices is None:
        choices = vllm_choices()
    problems: list[str] = []
    if knobs.enable_auto_tool_choice and not knobs.tool_call_parser:
        problems.append("enable_auto_tool_choice needs a tool_call_parser")
    plugin_registered: tuple[str, ...] = ()
    if knobs.tool_parser_plugin:
        try:
            plugin_registered = plugin_names(knobs.tool_parser_plugin)
        except (OSError, SyntaxError, ValueError) as e:
            problems.append(f"tool_parser_plugin {knobs.tool_parser_plugin}: {e}")
    if knobs.chat_template:
        if (problem := check_template(knobs.chat_template, model_dir)) is not None:
            problems.append(problem)
    if (
        knobs.max_cpu_loras is not None
        and knobs.max_loras
        and knobs.max_cpu_loras < knobs.max_loras
    ):
        problems.append(
            f"max_cpu_loras ({knobs.max_cpu_loras}) must be >= max_loras ({knobs.max_loras})"
        )
    if choices is None:  # vLLM not installed: the names cannot be checked here
        return problems
    checks = {
        "tool_call_parser": (knobs.tool_call_parser, plugin_registered),
        "reasoning_parser": (knobs.reasoning_parser, ()),
        "tool_strict_level": (knobs.tool_strict_level, ()),
        "structured_outputs_backend": (knobs.structured_outputs_backend, ()),
        "quantization": (knobs.quantization, ()),
        "max_lora_rank": (knobs.max_lora_rank, ()),
    }
    for field, (value, more) in checks.items():
        if value is None or value == "" or value in choices[field] or value in more:
            continue
        extra = ""
        if field == "tool_call_parser":
            extra = f"; or one the tool_parser_plugin registers ({', '.join(more) or 'none'})"
        problems.append(_unknown(field, value, choices[field], extra))
    return problems


DEFAULT_MAX_LORA_RANK = 16  # vLLM 0.32's LoRAConfig default


def adapter_problems(
    entry: Any, knobs: Any, resolve: Any = None, listing: Any = None
) -> tuple[list[str], list[Any]]:
    """``(problems, adapters)`` of an LLM entry's LoRA adapters: each is a stored adapter of this
    entry's base model, within ``max_lora_rank``, and there are at most ``max_adapters``.

    ``resolve``: served name -> :class:`models.llm_lora.Adapter` (StoreError if none);
    ``listing``: base store name -> adapter names (for ``adapters: all``).
    """
    from models.llm_lora import adapters_of, resolve_adapter
    from models.store import StoreError

    resolve = resolve or resolve_adapter
    listing = listing or adapters_of
    if entry.adapters is None:
        problems = []
        for knob in ("max_loras", "max_cpu_loras"):
            if getattr(entry, knob) is not None:
                problems.append(f"{knob} is set but the LLM serves no adapters (adapters:)")
        return problems, []
    base = entry.tag.split(":", 1)[0]
    names = listing(base) if entry.adapters == "all" else list(entry.adapters)
    problems: list[str] = []
    if len(names) > entry.max_adapters:
        problems.append(
            f"{len(names)} adapters ({', '.join(names)}) but max_adapters is {entry.max_adapters}"
        )
    rank_limit = knobs.max_lora_rank or DEFAULT_MAX_LORA_RANK
    found = []
    for served in names:
        try:
            adapter = resolve(served)
        except StoreError as e:
            problems.append(f"adapter {served!r}: {e}")
            continue
        if adapter.base != base:
            problems.append(
                f"adapter {served!r} ({adapter.tag}) adapts {adapter.base!r}, not {base!r}"
            )
        elif adapter.rank > rank_limit:
            problems.append(
                f"adapter {served!r} ({adapter.tag}) has rank {adapter.rank} > max_lora_rank "
                f"{rank_limit}"
            )
        else:
            found.append(adapter)
    return problems, found
