"""Typed, strict recipes: nested dataclasses hold the defaults and document each field; a YAML recipe overrides them,
`key.sub=value` arguments override the YAML (OmegaConf structured configs do the merging and type checks).

An unknown key is an error naming the closest valid key; illegal combinations are refused in `validate_recipe`,
the one place that knows them.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from vidtune.data.dataset import DataConfig, validate_data
from vidtune.data.families import FrameLimits
from vidtune.data.sources import SourceConfig, validate_source
from vidtune.train.objectives.settings import DPOSettings, GRPOSettings, validate_objective
from vidtune.train.training import quantization
from vidtune.train.training.quantization import QuantizationConfig, quantization_problem

VARIANTS = ("base", "instruct", "chat")
FINETUNE_MODES = ("lora", "full")
VISION_TOWER_MODES = ("frozen", "lora", "full")
DTYPES = ("auto", "bfloat16", "float16", "float32")
MIXED_PRECISION = ("auto", "bf16", "fp16", "no")
SCHEDULERS = ("cosine", "linear", "constant")
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit")
REPORT_TO = ("wandb", "tensorboard", "none")
RESUME = ("auto", "force", "restart")
EVAL_TASKS = ("qa", "multiple_choice", "caption", "recognition")
MC_SCORING = ("generate", "loglik")
ATTENTION = ("sdpa", "eager", "flash_attention_2")


MAX_RECIPE_BYTES = 1_000_000  # a recipe is a page of YAML; anything larger is a mistake or an attack
MAX_RECIPE_VALUES = 100_000  # values after YAML aliases expand: a 523-byte alias bomb expands to billions
ENV_RESOLVER = "oc.env"  # `${oc.env:HF_TOKEN}`: kept unresolved in everything vidtune saves or logs
MAX_RECIPE_DEPTH = 32  # a recipe nests 4 levels; 20,000 `[` printed a 3,000-line RecursionError
# Environment variables that hold secrets: their values may not name runs or folders (wandb uploads run names,
# folder names end up in logs, checkpoints and model cards).
SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|API_?KEY|ACCESS_?KEY|PRIVATE_?KEY|AUTH", re.I)
NAMING_KEYS = (("train", "output_dir"), ("logging", "run_name"), ("logging", "project"))


class RecipeLoader(yaml.SafeLoader):
    """safe_load's loader, but a key given twice in one mapping is an error (YAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the base class reports it
                continue
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first given on line {first})", key_node.start_mark
                )
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def load_yaml(text: str) -> Any:
    """YAML through RecipeLoader: safe tags only, no duplicate keys, bounded nesting (one line, never a traceback)."""
    try:
        return yaml.load(text, Loader=RecipeLoader)  # a SafeLoader: safe tags only
    except RecursionError:
        raise RecipeError(f"the YAML nests too deeply (a recipe nests at most {MAX_RECIPE_DEPTH} levels)") from None


class RecipeError(ValueError):
    """A recipe that cannot run; the message is one line naming the key and what to change."""


@dataclass
class ModelConfig:
    name_or_path: str = ""  # hub id or local folder of a LLaVA-NeXT-Video checkpoint
    adapter: str | None = None  # continue training this LoRA adapter (folder) instead of starting a new one
    dtype: str = "auto"  # weights dtype: auto (bfloat16 on GPUs that have it, else float32) | bfloat16 | ...
    attn_implementation: str = "sdpa"  # sdpa | eager | flash_attention_2
    gradient_checkpointing: bool = False  # recompute activations in backward: far less memory, ~30% slower
    trust_remote_code: bool = False  # run code shipped with the checkpoint (only for checkpoints you trust)
    frame_limits: FrameLimits = field(default_factory=FrameLimits)  # Qwen: per-frame pixels, tokens per video
    # build the architecture from name_or_path's config.json with random weights (no weights read or downloaded):
    # throughput benchmarks of the real architecture; name_or_path still supplies the processor files
    from_config: bool = False
    # QLoRA: `model.quantization.bits=4` loads the language model's linear layers 4-bit nf4 (quantization.py)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)


@dataclass
class LoraSettings:
    rank: int = 16
    alpha: int = 32
    dropout: float = 0.05
    # Linear-layer names to wrap inside the language model (and the vision tower when finetune.vision_tower=lora);
    # empty = the family's defaults (all attention and MLP projections). Matched only inside those parts, so a
    # name shared with another part (CLIP also has q_proj) never puts LoRA where the recipe did not ask.
    targets: list[str] = field(default_factory=list)


@dataclass
class FinetuneConfig:
    mode: str = "lora"  # lora: PEFT LoRA on the language model | full: train all language-model weights
    lora: LoraSettings = field(default_factory=LoraSettings)
    train_projector: bool = False  # also train the vision-language projector fully
    vision_tower: str = "frozen"  # frozen | lora | full
    # frozen | lora | full: the audio encoder (with its projection to the language model) of a family that hears
    # (Qwen2.5-Omni); lora wraps its attention and MLP projections
    audio_tower: str = "frozen"
    # Mixture-of-Experts families (Qwen3-Omni-MoE): also train the router (each layer's expert choice) fully; off,
    # it stays frozen in lora and full mode alike, so the experts learn under the routing they were trained with
    train_router: bool = False


@dataclass
class TrainConfig:
    output_dir: str = ""  # checkpoints, final adapter/model, processor and resolved recipe land here
    seed: int = 42
    num_epochs: float = 1.0  # passes over the training data (ignored when max_steps > 0)
    max_steps: int = 0  # optimizer steps to run; 0 = derive from num_epochs
    batch_size: int = 1  # samples per device per micro-batch
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    # AdamW's epsilon (HF Trainer's adam_epsilon): added to sqrt(v) before dividing, so a gradient much smaller than
    # it moves its weight in proportion to its size, not by a whole lr-sized step
    adam_epsilon: float = 1e-8
    warmup_ratio: float = 0.03  # fraction of the optimizer steps spent warming the learning rate up
    lr_scheduler: str = "cosine"  # cosine | linear | constant (after warmup)
    # adamw (torch, fp32 moments) | adamw_8bit (bitsandbytes: blockwise 8-bit moments, 2 bytes per trainable weight
    # instead of 8) | paged_adamw_8bit (the same, its states in CUDA unified memory paged to the host under pressure)
    optimizer: str = "adamw"
    max_grad_norm: float = 1.0  # gradient clipping; 0 disables
    mixed_precision: str = "auto"  # auto (bf16 on GPUs that have it, else none) | bf16 | fp16 | no
    group_by_length: bool = True  # batch samples of similar token count (video tokens included): less padding
    # pack each micro-batch's samples with no padding between them (data/packing.py): one row with flash-attention
    # varlen, first-fit rows of up to data.max_length with sdpa/eager; attention never crosses samples; same loss
    packing: bool = False
    log_every_steps: int = 10
    eval_every_steps: int = 0  # eval loss on the held-out split every N optimizer steps; 0 = only at the end
    save_every_steps: int = 0  # checkpoint every N optimizer steps; 0 = only the final save
    save_retry_s: float = 600.0  # a save that meets a full disk is retried this long (free space meanwhile)
    keep_last_checkpoints: int = 2
    # auto: resume the latest checkpoint unless data, world size or adapter changed; a finished run is not trained
    # again | force: resume despite such changes | restart: delete the folder's checkpoints and train from step 1
    resume: str = "auto"
    max_nonfinite_steps: int = 5  # a NaN/inf loss skips its step; this many in a row stop the run
    # the GPU's dense bf16 peak TFLOPs for train/mfu; 0 = looked up by GPU name (train/training/flops.py); on a
    # CPU or an unknown GPU without it, TFLOPs are logged but no MFU
    peak_tflops: float = 0.0
    # sft: supervised (next-token loss on the answers) | dpo: preference pairs | grpo: rewards on sampled answers
    # (train/objectives/); the reference of dpo and grpo is the starting model: under LoRA the adapter disabled, under
    # full fine-tuning a frozen copy (reference.py)
    objective: str = "sft"
    # ranks that share each sample's sequence (DeepSpeed Ulysses; train/training/sequence_split.py): the world is
    # data parallel x this; a long sample's activations and frames split across them. 1 = off
    sequence_parallel: int = 1
    dpo: DPOSettings = field(default_factory=DPOSettings)
    grpo: GRPOSettings = field(default_factory=GRPOSettings)


@dataclass
class LoggingConfig:
    # wandb (offline when no API key is configured; never prompts) | tensorboard (OUTPUT/tensorboard/) | none
    report_to: str = "wandb"
    project: str = "vidtune"
    run_name: str | None = None  # default: the output folder's name


@dataclass
class EvalConfig:
    """Generation-based evaluation: `vidtune eval`, and every N steps of training on a few held-out rows."""

    task: str = "qa"  # qa | multiple_choice | caption | recognition
    sources: list[SourceConfig] = field(default_factory=list)  # held-out rows; empty = data.eval_sources
    every_steps: int = 0  # during training: score generated answers every N optimizer steps (0 = never)
    max_samples: int = 64  # rows scored during training
    max_new_tokens: int = 32
    mc_scoring: str = "generate"  # multiple_choice: generate (parse the answered letter) | loglik (no parsing)
    classes: list[str] = field(default_factory=list)  # recognition: the class descriptions the model names one of
    prompt: str = ""  # recognition: the question to ask ("{classes}" = the class list); empty = the rows' own
    table_rows: int = 8  # samples (frame, question, prediction, reference) in the wandb table


@dataclass
class HubConfig:
    repo_id: str | None = None  # push the exported adapter here when `vidtune train` finishes (needs a token)
    private: bool = True
    revision: str | None = None  # a branch of the repo; created when missing
    license: str = "other"  # model card front matter
    datasets: list[str] = field(default_factory=list)  # Hub dataset ids for the model card


@dataclass
class Recipe:
    variant: str = "instruct"  # base (captioning) | instruct (question answering) | chat (multi-turn)
    model: ModelConfig = field(default_factory=ModelConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    hub: HubConfig = field(default_factory=HubConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# ----------------------------------------------------------------------------------------------------- loading


def _closest(word: str, options: list[str]) -> str:
    match = difflib.get_close_matches(word, options, n=1, cutoff=0.5)
    return f"; did you mean {match[0]!r}?" if match else f"; valid keys: {', '.join(options)}"


def check_keys(raw: Any, schema: Any, path: str = "") -> None:
    """Refuse keys the schema lacks, naming the full path (`data.sources[0].pth`) and the closest valid key."""
    if not isinstance(raw, dict):
        return
    fields = {f.name: f for f in dataclasses.fields(schema)}
    hints = _type_hints(schema)
    for key, value in raw.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in fields:
            raise RecipeError(f"unknown key {where!r}{_closest(str(key), list(fields))}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            check_keys(value, hint, where)
        elif isinstance(value, list) and getattr(hint, "__origin__", None) is list:
            item = hint.__args__[0]
            if dataclasses.is_dataclass(item):
                for i, element in enumerate(value):
                    check_keys(element, item, f"{where}[{i}]")


def _type_hints(schema: Any) -> dict[str, Any]:
    import typing

    return typing.get_type_hints(schema)


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise RecipeError("not key.sub=value")
    key, raw = text.split("=", 1)
    try:
        value: Any = load_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise RecipeError(f"invalid YAML value ({' '.join(str(err).split())[:160]})") from None
    if isinstance(value, bool) and raw.strip().lower() not in ("true", "false"):
        value = raw.strip()  # YAML 1.1 reads no/yes/off/on as booleans: `train.mixed_precision=no` means "no"
    count_values(value)
    return key.strip(), value


def load_recipe(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Defaults <- YAML recipe <- `key.sub=value` overrides, checked and validated."""
    source = str(path) if path else "defaults"
    raw: dict[str, Any] = {}
    try:
        if path:
            raw = read_recipe_yaml(Path(path))
        check_keys(raw, Recipe)
        config = OmegaConf.merge(OmegaConf.structured(Recipe), OmegaConf.create(raw))
        for text in overrides:
            apply_override(config, text)
        unresolved = env_interpolations(OmegaConf.to_container(config, resolve=False))
        recipe = OmegaConf.to_object(config)
        assert isinstance(recipe, Recipe)
        check_types(recipe, Recipe, "")
    except OverrideError:
        raise  # names the command-line item, not the recipe file
    except RecipeError as err:
        raise RecipeError(f"{source}: {err}") from None
    except OmegaConfBaseException as err:
        raise RecipeError(f"{source}: {_omegaconf_message(err)}") from None
    # Where the recipe took a value from the environment (a token, a path): saved and logged copies keep the
    # `${oc.env:...}` text, never the value (recipe_to_yaml / recipe_to_dict).
    object.__setattr__(recipe, "_env_interpolations", unresolved)
    refuse_secret_names(recipe, source)
    validate_recipe(recipe, source)
    return recipe


def refuse_secret_names(recipe: Recipe, source: str = "recipe") -> None:
    """A run name or output folder built from a secret (`run_name: ${oc.env:HF_TOKEN}`) would write it into wandb's
    run files (uploaded when online), folder names and logs: refused, naming the variable, never its value."""
    secrets = {
        name: value for name, value in os.environ.items() if SECRET_NAME.search(name) and len(value.strip()) >= 8
    }
    for section, key in NAMING_KEYS:
        value = getattr(getattr(recipe, section), key)
        found = next((name for name, secret in secrets.items() if value and secret.strip() in value), None)
        if found:
            raise RecipeError(
                f"{source}: {section}.{key} holds the value of ${found}, a secret; it would name folders and be "
                "logged and uploaded: choose another value"
            )


class OverrideError(RecipeError):
    """A bad `key.sub=value` command-line item: the message names it, never the recipe file."""


def _omegaconf_message(err: OmegaConfBaseException) -> str:
    at = getattr(err, "full_key", None)
    return str(err).splitlines()[0] + (f" (at {at})" if at else "")


def apply_override(config: Any, text: str) -> None:
    try:
        key, value = parse_override(text)
        check_override_key(key)
        OmegaConf.update(config, key, value, merge=True)
    except RecipeError as err:
        raise OverrideError(f"command-line override {text!r}: {err}") from None
    except OmegaConfBaseException as err:
        raise OverrideError(f"command-line override {text!r}: {_omegaconf_message(err)}") from None


def read_recipe_yaml(path: Path) -> dict[str, Any]:
    """The YAML mapping of a recipe file, bounded: size, alias expansion, and safe tags only, each a one-line error."""
    if not path.is_file():
        raise RecipeError(f"recipe {path} not found")
    if path.stat().st_size > MAX_RECIPE_BYTES:
        raise RecipeError(f"the recipe is {path.stat().st_size:,} bytes; recipes are limited to {MAX_RECIPE_BYTES:,}")
    try:
        raw = load_yaml(path.read_text(encoding="utf-8-sig")) or {}
    except yaml.MarkedYAMLError as err:  # syntax errors, !!python/... tags (safe_load refuses them): where first
        mark = err.problem_mark or err.context_mark
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = " ".join(f"{err.context or ''} {err.problem or ''}".split())
        raise RecipeError(f"{at}invalid YAML: {problem[:200]}") from None
    except yaml.YAMLError as err:
        raise RecipeError(f"invalid YAML: {' '.join(str(err).split())[:200]}") from None
    except UnicodeDecodeError as err:
        raise RecipeError(f"not UTF-8 text ({err.reason} at byte {err.start})") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"a recipe is a YAML mapping, got {type(raw).__name__}")
    count_values(raw)
    return raw


def count_values(raw: Any) -> None:
    """Refuse a recipe whose aliases expand to more than MAX_RECIPE_VALUES values. safe_load shares aliased nodes
    (cheap), but everything downstream copies them: a 523-byte alias bomb took minutes and gigabytes there. The walk
    stops at the limit, so counting costs at most MAX_RECIPE_VALUES visits."""
    pending, seen = [(raw, 0)], 0
    while pending:
        value, depth = pending.pop()
        seen += 1
        if seen > MAX_RECIPE_VALUES:
            raise RecipeError(
                f"the recipe expands to more than {MAX_RECIPE_VALUES:,} values (YAML aliases); write it out plainly"
            )
        if depth > MAX_RECIPE_DEPTH:
            raise RecipeError(f"the recipe nests deeper than {MAX_RECIPE_DEPTH} levels")
        if isinstance(value, dict):
            pending.extend((item, depth + 1) for item in [*value.keys(), *value.values()])
        elif isinstance(value, list):
            pending.extend((item, depth + 1) for item in value)


def env_interpolations(container: Any, path: tuple[Any, ...] = ()) -> dict[tuple[Any, ...], str]:
    """{key path: raw text} of every value that reads the environment (`${oc.env:...}`)."""
    found: dict[tuple[Any, ...], str] = {}
    items = (
        container.items()
        if isinstance(container, dict)
        else enumerate(container)
        if isinstance(container, list)
        else ()
    )
    for key, value in items:
        if isinstance(value, str) and ENV_RESOLVER in value and "${" in value:
            found[(*path, key)] = value
        else:
            found.update(env_interpolations(value, (*path, key)))
    return found


def check_types(value: Any, hint: Any, where: str) -> None:
    """Every value of the recipe against its declared type, list elements and dict values included, and every
    number finite: OmegaConf lets a nested list into a list[str] (`hub.datasets: [[x]]`), which then failed only
    when the run was saved, after training."""
    name = where or "recipe"
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        hints = typing.get_type_hints(hint)
        for f in dataclasses.fields(hint):
            check_types(getattr(value, f.name), hints[f.name], f"{where}.{f.name}" if where else f.name)
    elif origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return
        check_types(value, next(o for o in options if o is not type(None)), where)
    elif origin is list:
        if not isinstance(value, list):
            raise RecipeError(f"{name} must be a list, got {type(value).__name__}")
        for i, element in enumerate(value):
            check_types(element, typing.get_args(hint)[0], f"{where}[{i}]")
    elif origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{name} must be a mapping, got {type(value).__name__}")
        for key, element in value.items():
            check_types(key, typing.get_args(hint)[0], f"{where} key {key!r}")
            check_types(element, typing.get_args(hint)[1], f"{where}.{key}")
    elif hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise RecipeError(f"{name} must be a finite number, got {value!r}")
    elif hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{name} must be an integer, got {value!r}")
    elif hint in (str, bool) and not isinstance(value, hint):
        raise RecipeError(f"{name} must be a {hint.__name__}, got {type(value).__name__} {value!r}")


def check_override_key(key: str) -> None:
    """Walk `a.b.0.c` through the schema so a typo in an override gets the same closest-key message."""
    schema: Any = Recipe
    walked: list[str] = []
    for part in key.split("."):
        if part.isdigit() and walked:
            continue
        if not dataclasses.is_dataclass(schema):
            return
        hints = _type_hints(schema)
        if part not in hints:
            raise RecipeError(f"unknown key {'.'.join([*walked, part])!r}{_closest(part, list(hints))}")
        walked.append(part)
        schema = hints[part]
        if getattr(schema, "__origin__", None) is list:
            schema = schema.__args__[0]


def recipe_to_yaml(recipe: Recipe) -> str:
    """The recipe as saved with checkpoints and runs: values read from the environment stay `${oc.env:...}`."""
    return OmegaConf.to_yaml(OmegaConf.create(recipe_to_dict(recipe)))


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """The resolved recipe as a plain dict (what wandb logs), environment values put back as `${oc.env:...}`."""
    plain = dataclasses.asdict(recipe)
    for path, text in getattr(recipe, "_env_interpolations", {}).items():
        node: Any = plain
        try:
            for key in path[:-1]:
                node = node[key]
            node[path[-1]] = text
        except (KeyError, IndexError, TypeError):
            continue  # an override replaced the structure the interpolation sat in
    return plain


# -------------------------------------------------------------------------------------------------- validation


def tensorboard_installed() -> bool:
    """Accelerate's TensorBoard tracker writes through torch.utils.tensorboard (the tensorboard package) or
    tensorboardX; checked with the recipe, before any model loads."""
    import importlib.util

    return any(importlib.util.find_spec(name) is not None for name in ("tensorboard", "tensorboardX"))


def _choice(value: str, choices: tuple[str, ...], key: str) -> None:
    if value not in choices:
        hint = difflib.get_close_matches(value, choices, n=1)
        suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
        raise RecipeError(f"{key}={value!r} is not one of {', '.join(choices)}{suggestion}")


def validate_recipe(recipe: Recipe, source: str = "recipe") -> None:
    """Every illegal combination, refused with a message that says what to change."""
    try:
        _validate(recipe)
    except RecipeError as err:
        raise RecipeError(f"{source}: {err}") from None
    except ValueError as err:  # data-layer validation errors (DataError)
        raise RecipeError(f"{source}: {err}") from None


def _validate(recipe: Recipe) -> None:
    m, f, t, lg = recipe.model, recipe.finetune, recipe.train, recipe.logging
    _choice(recipe.variant, VARIANTS, "variant")
    _choice(m.dtype, DTYPES, "model.dtype")
    _choice(m.attn_implementation, ATTENTION, "model.attn_implementation")
    _choice(f.mode, FINETUNE_MODES, "finetune.mode")
    _choice(f.vision_tower, VISION_TOWER_MODES, "finetune.vision_tower")
    _choice(f.audio_tower, VISION_TOWER_MODES, "finetune.audio_tower")
    _choice(t.lr_scheduler, SCHEDULERS, "train.lr_scheduler")
    _choice(t.optimizer, OPTIMIZERS, "train.optimizer")
    if t.optimizer != "adamw" and not quantization.bitsandbytes_installed():
        raise RecipeError(
            f"train.optimizer={t.optimizer} needs bitsandbytes: pip install 'vidtune[qlora]' "
            "(or set train.optimizer=adamw)"
        )
    _choice(t.mixed_precision, MIXED_PRECISION, "train.mixed_precision")
    _choice(lg.report_to, REPORT_TO, "logging.report_to")
    if lg.report_to == "tensorboard" and not tensorboard_installed():
        raise RecipeError("logging.report_to: tensorboard needs the tensorboard package (pip install tensorboard)")
    _choice(t.resume, RESUME, "train.resume")
    _choice(recipe.eval.task, EVAL_TASKS, "eval.task")
    _choice(recipe.eval.mc_scoring, MC_SCORING, "eval.mc_scoring")
    if recipe.eval.every_steps and not (recipe.eval.sources or recipe.data.eval_sources):
        raise RecipeError("eval.every_steps needs held-out rows: set eval.sources or data.eval_sources")
    if recipe.eval.every_steps < 0 or recipe.eval.max_samples < 1 or recipe.eval.max_new_tokens < 1:
        raise RecipeError("eval.every_steps must be >= 0, eval.max_samples and eval.max_new_tokens >= 1")
    if not m.name_or_path:
        raise RecipeError("model.name_or_path is empty: give a hub id or a local checkpoint folder")
    if not t.output_dir:
        raise RecipeError("train.output_dir is empty")
    if f.mode == "full" and f.vision_tower == "lora":
        raise RecipeError("finetune.vision_tower=lora needs finetune.mode=lora (full mode trains no adapters)")
    if f.mode == "full" and f.audio_tower == "lora":
        raise RecipeError("finetune.audio_tower=lora needs finetune.mode=lora (full mode trains no adapters)")
    if problem := quantization_problem(m.quantization, f.mode, m.from_config):
        raise RecipeError(problem)
    if m.adapter and f.mode != "lora":
        raise RecipeError("model.adapter continues a LoRA adapter: set finetune.mode=lora")
    if f.lora.rank < 1 or f.lora.alpha <= 0 or not 0 <= f.lora.dropout < 1:
        raise RecipeError("finetune.lora needs rank >= 1, alpha > 0 and 0 <= dropout < 1")
    limits = [(f"model.frame_limits.{k}", v) for k, v in dataclasses.asdict(m.frame_limits).items()]
    if any(v is not None and v < 1 for _, v in limits):
        raise RecipeError(f"{', '.join(k for k, v in limits if v is not None and v < 1)} must be >= 1 (or unset)")
    positive = {
        "train.batch_size": t.batch_size,
        "train.grad_accum_steps": t.grad_accum_steps,
        "train.max_nonfinite_steps": t.max_nonfinite_steps,
        "train.log_every_steps": t.log_every_steps,
        "train.keep_last_checkpoints": t.keep_last_checkpoints,
    }
    for key, value in positive.items():
        if value < 1:
            raise RecipeError(f"{key} must be >= 1, got {value}")
    if not 0 <= t.seed < 2**32:
        raise RecipeError(f"train.seed must be in [0, 2**32), got {t.seed}")
    if t.max_grad_norm < 0 or t.weight_decay < 0 or t.num_epochs < 0 or t.save_retry_s < 0:
        raise RecipeError("train.max_grad_norm, weight_decay, num_epochs and save_retry_s must be >= 0")
    if t.peak_tflops < 0:
        raise RecipeError(f"train.peak_tflops must be >= 0 (0 = look the GPU up), got {t.peak_tflops}")
    if t.max_steps < 0 or t.eval_every_steps < 0 or t.save_every_steps < 0:
        raise RecipeError("train.max_steps, eval_every_steps and save_every_steps must be >= 0")
    if t.max_steps == 0 and t.num_epochs <= 0:
        raise RecipeError("set train.max_steps > 0 or train.num_epochs > 0")
    if t.learning_rate <= 0 or not 0 <= t.warmup_ratio < 1:
        raise RecipeError("train.learning_rate must be > 0 and train.warmup_ratio in [0, 1)")
    if not t.adam_epsilon > 0:
        raise RecipeError(f"train.adam_epsilon must be > 0, got {t.adam_epsilon}")
    if t.mixed_precision == "fp16" and m.dtype == "bfloat16":
        raise RecipeError("train.mixed_precision=fp16 with model.dtype=bfloat16: use bf16 or float32 weights")
    if recipe.data.streaming and (recipe.data.eval_fraction or t.max_steps == 0):
        raise RecipeError("data.streaming needs train.max_steps (the stream's length is unknown) and eval_sources")
    validate_data(recipe.data)
    _validate_objective(recipe)
    for source in [*recipe.data.sources, *recipe.data.eval_sources, *recipe.eval.sources]:
        validate_source(source)


def _validate_objective(recipe: Recipe) -> None:
    t = recipe.train
    problem = validate_objective(t.objective, t.dpo, t.grpo)
    if problem:
        raise RecipeError(problem)
    if recipe.model.adapter and (t.objective == "dpo" or (t.objective == "grpo" and t.grpo.beta)):
        # PEFT's disable_adapter switches the continued adapter off too: the reference would be the bare base
        raise RecipeError(
            f"train.objective={t.objective} with model.adapter: its reference (the adapter disabled) would be the base "
            "without that adapter, not the model this stage starts from; merge it first (vidtune export RUN --to DIR "
            "--merge) and set model.name_or_path=DIR"
        )
    if t.objective != "sft" and (t.packing or recipe.data.streaming):
        raise RecipeError(f"train.objective={t.objective} trains on padded map-style batches: unset packing/streaming")
    from vidtune.train.training.sequence_split import recipe_problem

    if problem := recipe_problem(t, recipe.model, recipe.data):
        raise RecipeError(problem)


def packaged_recipe(name: str) -> Path:
    """A recipe shipped inside the package (`demo/base` -> .../vidtune/recipes/demo/base.yaml)."""
    import vidtune.recipes

    root = Path(next(iter(vidtune.recipes.__path__)))
    path = root / (name if name.endswith(".yaml") else f"{name}.yaml")
    if not path.is_file():
        available = sorted(str(p.relative_to(root))[:-5] for p in root.rglob("*.yaml"))
        raise RecipeError(f"no recipe {name!r}; packaged recipes: {', '.join(available)}")
    return path


def resolve_recipe_path(name_or_path: str) -> Path:
    """A path to a YAML file, or the name of a packaged recipe."""
    if os.path.exists(name_or_path):
        return Path(name_or_path)
    return packaged_recipe(name_or_path)
