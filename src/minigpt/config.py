"""Run configuration as data: TOML files loaded into typed dataclasses, with dotted overrides.

A config has sections (`model`, `data`, `train`, `eval`, `log`, `dpo`, `rm`, `rl`), each a
dataclass whose fields are the only valid keys; a field may be a table of named entries, each a
dataclass too (`[eval.task.hellaswag]`, overridden as `eval.task.hellaswag.every`). `load_config(path,
overrides)` reads a TOML file, applies command-line overrides such as `{"train.max_steps": "20"}`,
and checks every key and type: a typo or a wrong type is a `ConfigError` that names the key and
lists the valid ones. Keys of an older spelling (`RENAMED`) are still read, with a warning.
`dump_config` writes the resolved config back as TOML (the run directory's `config.toml`), so a
run records what it ran.
"""

from __future__ import annotations

import json
import math
import os
import re
import types
import typing
import warnings
from dataclasses import dataclass, field, fields, is_dataclass
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
    # dpo / rm pairs built from conversations: the rejected reply is "other" (another
    # conversation's reply) or "shuffled" (the real reply's words in a random order)
    rejected: str = "other"


@dataclass
class TrainSection:
    max_steps: int = 19073
    micro_batch: int = 64  # sequences per forward pass on each process
    total_batch_tokens: int = 524288  # tokens per optimizer step, over all processes
    sequence_length: int = 1024
    max_lr: float = 6e-4
    min_lr: float = 6e-5
    warmup_steps: int = 715
    weight_decay: float = 0.1  # AdamW's, on matrices and embeddings only
    # adamw | muon (Muon on the blocks' 2-D matrices, AdamW with max_lr on the embeddings, the
    # head, LayerNorms and biases; both on the same warmup + cosine schedule)
    optimizer: str = "adamw"
    muon_lr: float = 0.02  # Muon's peak learning rate (scaled by the schedule as max_lr is)
    muon_momentum: float = 0.95  # Nesterov momentum of Muon
    muon_weight_decay: float = 0.0  # decoupled, applied as lr x decay per step, Muon's matrices
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0  # global-norm clipping; 0 disables it
    checkpoint_every: int = 1000
    checkpoint_minutes: float = 0.0  # also checkpoint when this much wall time has passed; 0 = off
    keep_last: int = 3  # checkpoints kept (>= 2: a fallback past a damaged one); 0 keeps all
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
    # ddp (every process keeps all weights, gradients and AdamW state) | fsdp (each keeps its
    # 1/N share: FSDP2 on every block and the root; checkpoints sharded)
    parallel: str = "ddp"
    activation_checkpointing: bool = False  # recompute each block in the backward pass
    cpu_offload: bool = False  # fsdp only: sharded weights, gradients and AdamW state in CPU memory


@dataclass
class TaskSchedule:
    """One benchmark task on its own schedule during pre-training, `[eval.task.<name>]` (e.g.
    `[eval.task.hellaswag]`), apart from `eval.tasks` and their tasks_core mean."""

    every: int = 0  # every N steps (and at the end); 0 = never
    limit: int = 0  # the first N examples; 0 = all (HellaSwag: 10,042)
    # a JSONL/JSON/Arrow/Parquet file or directory, or a hub name (Rowan/hellaswag); "" = the
    # offline copy, else for HellaSwag the official file (downloaded once), for the others the hub
    data: str = ""
    batch_size: int = 16


@dataclass
class EvalSection:
    val_tokens: int = 10 * 524288  # fixed validation tokens from the start of the val split
    sample_prompts: list[str] = field(
        default_factory=lambda: ["Hello, I'm a language model,", "The meaning of life is"]
    )
    sample_tokens: int = 32  # new tokens per prompt; 0 disables sampling
    sample_top_k: int = 50
    # benchmark tasks (names from `minigpt eval suite --help`) on one schedule, logged as
    # <task>_acc / <task>_acc_norm plus their CORE-style mean tasks_core; data from the offline
    # copy, else the hub
    tasks: list[str] = field(default_factory=list)
    tasks_every: int = 0  # every N steps (and at the end); 0 = never
    tasks_limit: int = 0  # the first N examples of each task; 0 = all
    tasks_batch_size: int = 16
    # tasks on their own schedules, by name: [eval.task.hellaswag] every = 250
    task: dict[str, TaskSchedule] = field(default_factory=dict)


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
class RMSection:
    """`minigpt rm` only (see minigpt.train.rm)."""

    # weight of the penalty coefficient * mean((r_chosen + r_rejected)^2) that keeps rewards
    # centred on 0 (Eisenstein et al. 2023, TRL's center_rewards_coefficient); 0 = off
    center_rewards_coefficient: float = 0.0


@dataclass
class RLSection:
    """`minigpt rl` only (see minigpt.train.rl)."""

    num_generations: int = 4  # completions sampled per prompt (the group)
    max_completion_tokens: int = 32
    temperature: float = 1.0
    top_k: int = 0  # 0 = no top-k cut
    reward_model: str = ""  # a `minigpt rm` run or checkpoint; "" = none
    reward: list[str] = field(default_factory=list)  # "module:function" or "path/file.py:fn"
    # one weight per reward: the reward model first, then rl.reward in order; [] = all 1
    reward_weights: list[float] = field(default_factory=list)
    loss_type: str = "grpo"  # grpo (group-normalised advantages) | rloo (leave-one-out baseline)
    epsilon: float = 0.2  # PPO clip range of the probability ratio
    num_iterations: int = 1  # optimizer steps on each batch of rollouts
    beta: float = 0.04  # weight of the k3 KL estimate to the starting model; 0 = no KL term


@dataclass
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    log: LogSection = field(default_factory=LogSection)
    dpo: DPOSection = field(default_factory=DPOSection)
    rm: RMSection = field(default_factory=RMSection)
    rl: RLSection = field(default_factory=RLSection)


# keys from before HellaSwag was one of the tasks -> their spelling now; still read, with a warning
RENAMED = {
    f"eval.hellaswag_{name}": f"eval.task.hellaswag.{name}"
    for name in ("every", "limit", "data", "batch_size")
}


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


def _renamed(key: str) -> str:
    """`key` in today's spelling; an old key is warned about once (under torchrun every rank reads
    the config: rank 0 alone says so, as it alone reports config errors)."""
    if key not in RENAMED:
        return key
    new = RENAMED[key]
    if os.environ.get("RANK", "0") == "0":
        table, _, name = new.rpartition(".")
        message = f"{key} is deprecated: write {new} ({name} = ... under [{table}] in a file)"
        warnings.warn(message, FutureWarning, stacklevel=2)
    return new


def _target(config: RunConfig, key: str) -> tuple[object, str, object]:
    """(what holds `key`, its name there, its type hint): a section's field, or under a table
    field such as `eval.task` the table, one entry of it, or an entry's field (the entry made
    with its defaults on first use). A key the schema lacks is a ConfigError listing valid ones."""
    section_name, _, rest = key.partition(".")
    sections = _section_types(config)
    if section_name not in sections or not rest:
        raise ConfigError(
            f"unknown config section in {key!r}; valid sections: {', '.join(sections)}"
        )
    section = getattr(config, section_name)
    hints = _field_types(sections[section_name])
    name, _, rest = rest.partition(".")
    if name not in hints or (rest and typing.get_origin(hints[name]) is not dict):
        raise ConfigError(
            f"unknown config key {key!r}; valid keys in [{section_name}]: {', '.join(hints)}"
        )
    if not rest:
        return section, name, hints[name]
    table, table_type = getattr(section, name), typing.get_args(hints[name])[1]
    entry, _, entry_field = rest.partition(".")
    if not entry_field:
        return table, entry, table_type
    entry_hints = _field_types(table_type)
    if not entry or entry_field not in entry_hints:
        raise ConfigError(
            f"unknown config key {key!r}; valid keys in [{section_name}.{name}.<name>]: "
            f"{', '.join(entry_hints)}"
        )
    return table.setdefault(entry, table_type()), entry_field, entry_hints[entry_field]


def _set(config: RunConfig, key: str, value: object, from_text: bool = False) -> None:
    """Set `key` to `value` (command-line text when `from_text`: parsed by the field's type)."""
    key = _renamed(key)
    holder, name, hint = _target(config, key)
    if from_text and hint is not str:
        value = _parse_override(value)
    if typing.get_origin(hint) is dict or is_dataclass(hint):  # a table: key by key
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a table ([{key}.<name>]), got {value!r}")
        for sub, item in value.items():
            _set(config, f"{key}.{sub}", item)
        return
    setattr(holder, name, _check_value(key, hint, value))


def _parse_override(text: str) -> object:
    """Command-line text as a TOML value; plain strings need no quotes (`--data.dir=/x`)."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(config: RunConfig, overrides: dict[str, str]) -> None:
    """Apply `{"section.key": "text"}` overrides, parsing text by the field's type."""
    for key, text in overrides.items():
        _set(config, key, text, from_text=True)


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


def _toml_key(name: str) -> str:
    return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else json.dumps(name, ensure_ascii=False)


def _toml_lines(holder: object) -> tuple[list[str], dict[str, dict]]:
    """`key = value` lines of a dataclass's fields, and apart its table fields (dicts)."""
    lines, tables = [], {}
    for f in fields(holder):
        value = getattr(holder, f.name)
        if isinstance(value, dict):
            tables[f.name] = value
        elif value is not None:  # TOML has no null: an absent key means "default"
            lines.append(f"{f.name} = {_toml_value(value)}")
    return lines, tables


def dump_config(config: RunConfig) -> str:
    """The config as TOML text that `load_config` reads back to an equal config."""
    lines = []
    for section_field in fields(config):
        name = section_field.name
        keys, tables = _toml_lines(getattr(config, name))
        lines += [f"[{name}]", *keys, ""]
        for table, entries in tables.items():  # after the section's own keys, as TOML wants
            for entry, values in entries.items():
                lines += [f"[{name}.{table}.{_toml_key(entry)}]", *_toml_lines(values)[0], ""]
    return "\n".join(lines)
