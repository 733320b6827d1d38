"""Run configuration as data: TOML files loaded into typed dataclasses, with dotted overrides.

A config has sections (`model`, `data`, `train`, `eval`, `log`, `dpo`), each a dataclass whose
fields are the only valid keys. `load_config(path, overrides)` reads a TOML file, applies command-line
overrides such as `{"train.max_steps": "20"}`, and checks every key and type: a typo or a wrong
type is a `ConfigError` that names the key and lists the valid ones. `dump_config` writes the
resolved config back as TOML (the run directory's `config.toml`), so a run records what it ran.
"""

from __future__ import annotations

import json
import math
import os
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from minigpt.errors import MinigptError


class ConfigError(MinigptError, ValueError):
    """A config file or override that does not fit the schema."""


@dataclass
class ModelSection:
    preset: str = "gpt2"  # a name from minigpt.model.PRESETS
    dropout: float = 0.0
    # shape overrides on top of the preset; left out = the preset's value
    n_layer: int | None = None
    n_head: int | None = None
    n_embd: int | None = None
    block_size: int | None = None


@dataclass
class DataSection:
    dir: str = "data/fineweb-edu"  # a dataset directory written by `minigpt prepare`
    # fine-tuning (`minigpt sft`, `minigpt dpo`) only: conversations or preference pairs from a
    # hub name, a .json/.jsonl file, or "chitchat"; format one of minigpt.data.chat.PARSERS
    # (sft) or minigpt.data.preference's formats (dpo); "" = inferred from the source
    source: str = ""
    format: str = ""
    split: str = "train"  # the hub split to read
    limit: int = 0  # read at most this many records; 0 = all
    val_fraction: float = 0.05  # the last conversations (at least one) held out for val_loss


@dataclass
class TrainSection:
    max_steps: int = 19073
    micro_batch: int = 64  # sequences per forward pass on each process
    total_batch_tokens: int = 524288  # tokens per optimizer step, over all processes
    sequence_length: int = 1024
    max_lr: float = 6e-4
    min_lr: float = 6e-5
    warmup_steps: int = 715
    weight_decay: float = 0.1  # on matrices and embeddings only
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0  # global-norm clipping; 0 disables it
    checkpoint_every: int = 1000
    checkpoint_minutes: float = 0.0  # also checkpoint when this much wall time has passed; 0 = off
    keep_last: int = 3  # checkpoints kept; older ones are deleted; 0 keeps all
    # how long a collective waits for the slowest rank; covers rank 0 writing a gpt2-xl checkpoint
    # (weights + AdamW state, ~20 GB) to a slow disk while the other ranks wait
    dist_timeout_minutes: float = 60.0
    eval_every: int = 250
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # auto (bf16 on CUDA compute capability 8+, fp16 + GradScaler below, fp32 on CPU) | float32 |
    # bfloat16 | float16
    dtype: str = "auto"
    # torch.compile the training forward, one graph per batch shape (fine-tuning pads batches
    # to power-of-two lengths from 64, and sequence_length: 5 graphs for 1024)
    compile: bool = False


@dataclass
class EvalSection:
    val_tokens: int = 10 * 524288  # fixed validation tokens from the start of the val split
    sample_prompts: list[str] = field(
        default_factory=lambda: ["Hello, I'm a language model,", "The meaning of life is"]
    )
    sample_tokens: int = 32  # new tokens per prompt; 0 disables sampling
    sample_top_k: int = 50
    hellaswag_every: int = 0  # HellaSwag every N steps (and at the end); 0 = never
    hellaswag_limit: int = 0  # score the first N validation examples; 0 = all 10,042
    hellaswag_data: str = ""  # JSONL/Arrow file or dir, or Rowan/hellaswag; "" = official file
    hellaswag_batch_size: int = 16
    # benchmark tasks (names from `minigpt eval suite --help`), scored like HellaSwag and logged as
    # <task>_acc / <task>_acc_norm plus tasks_core; data from the offline copy, else the hub
    tasks: list[str] = field(default_factory=list)
    tasks_every: int = 0  # every N steps (and at the end); 0 = never
    tasks_limit: int = 0  # the first N examples of each task; 0 = all
    tasks_batch_size: int = 16


@dataclass
class LogSection:
    progress: bool = True  # tqdm progress bar on rank 0
    tensorboard: bool = True  # scalars under RUN/tb/ when tensorboard is installed
    peak_tflops: float = 0.0  # device peak for MFU; 0 = look the GPU up, none on CPU


@dataclass
class DPOSection:
    """`minigpt dpo` only (see minigpt.train.dpo)."""

    beta: float = 0.1  # how far the policy may move from the reference (the paper's beta)
    loss_type: str = "sigmoid"  # sigmoid (DPO) | robust | ipo | hinge
    label_smoothing: float = 0.0  # assumed share of flipped labels (sigmoid, robust); 0 = none
    reference: str = "precomputed"  # precomputed (log-probs stored in RUN/) | model (live copy)


@dataclass
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    log: LogSection = field(default_factory=LogSection)
    dpo: DPOSection = field(default_factory=DPOSection)


def _section_types(config: RunConfig) -> dict[str, type]:
    return {f.name: type(getattr(config, f.name)) for f in fields(config)}


def _field_types(section_cls: type) -> dict[str, object]:
    return typing.get_type_hints(section_cls)


def _type_name(hint: object) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _check_value(key: str, hint: object, value: object) -> object:
    """`value` converted to `hint` (int -> float only), or a ConfigError naming `key`."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        return _check_value(key, options[0], value)
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list of {_type_name(item)}, got {value!r}")
        return [_check_value(f"{key}[{i}]", item, v) for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    # bool is an int subclass in Python but a different TOML type: never accept one for the other
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{key} must be {_type_name(hint)}, got {type(value).__name__} {value!r}")
    return value


def _set(config: RunConfig, key: str, value: object) -> None:
    section_name, _, name = key.partition(".")
    sections = _section_types(config)
    if section_name not in sections or not name:
        raise ConfigError(
            f"unknown config section in {key!r}; valid sections: {', '.join(sections)}"
        )
    hints = _field_types(sections[section_name])
    if name not in hints:
        raise ConfigError(
            f"unknown config key {key!r}; valid keys in [{section_name}]: {', '.join(hints)}"
        )
    setattr(getattr(config, section_name), name, _check_value(key, hints[name], value))


def _parse_override(text: str) -> object:
    """Command-line text as a TOML value; plain strings need no quotes (`--data.dir=/x`)."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(config: RunConfig, overrides: dict[str, str]) -> None:
    """Apply `{"section.key": "text"}` overrides, parsing text by the field's type."""
    for key, text in overrides.items():
        section_name, _, name = key.partition(".")
        section = getattr(config, section_name, None)
        hint = _field_types(type(section)).get(name) if section is not None else None
        value = text if hint is str else _parse_override(text)
        _set(config, key, value)


def config_from_dict(data: dict) -> RunConfig:
    """A RunConfig from nested TOML data, every key and type checked."""
    config = RunConfig()
    for section_name, values in data.items():
        if not isinstance(values, dict):
            raise ConfigError(
                f"{section_name!r} must be a [section]; valid sections: "
                f"{', '.join(_section_types(config))}"
            )
        for name, value in values.items():
            _set(config, f"{section_name}.{name}", value)
    return config


def load_config(
    path: str | os.PathLike | None, overrides: dict[str, str] | None = None
) -> RunConfig:
    """Read a TOML config (None = all defaults) and apply dotted overrides."""
    data = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: no such config file")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML ({e})") from e
    config = config_from_dict(data)
    apply_overrides(config, overrides or {})
    return config


def parse_override_args(args: list[str]) -> dict[str, str]:
    """`["--train.max_steps=20", "--data.dir", "x"]` -> `{"train.max_steps": "20", ...}`."""
    overrides, i = {}, 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ConfigError(f"unrecognized argument {arg!r}; overrides look like --train.seed=1")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise ConfigError(f"override --{key} needs a value")
            i += 1
            value = args[i]
        overrides[key] = value
        i += 1
    return overrides


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return {math.inf: "inf", -math.inf: "-inf"}.get(value, "nan")
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a JSON string is a TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def dump_config(config: RunConfig) -> str:
    """The config as TOML text that `load_config` reads back to an equal config."""
    lines = []
    for section_field in fields(config):
        lines.append(f"[{section_field.name}]")
        section = getattr(config, section_field.name)
        for f in fields(section):
            value = getattr(section, f.name)
            if value is not None:  # TOML has no null: an absent key means "default"
                lines.append(f"{f.name} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)
