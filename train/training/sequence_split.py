"""Sequence parallelism (`train.sequence_parallel: N`): a group of N ranks shares each sample's sequence, so a
sample too long for one GPU's activations (a 7B at 256 frames: 50k-100k tokens) trains on N of them.

Backend: DeepSpeed's Ulysses (ALST, deepspeed/runtime/sequence_parallel/ulysses_sp.py), switched on through
Accelerate's `ParallelismConfig(sp_size=N, sp_backend="deepspeed")`: `accelerator.prepare` registers its
`UlyssesSPAttentionHF` in place of the model's attention function (an all-to-all turns sequence shards into head
shards before attention and back after) and hands DeepSpeed the sequence-parallel groups. Chosen over torch context
parallelism (`ParallelismConfig(cp_size)`) because vidtune's multi-GPU engine is DeepSpeed ZeRO-2/3, which Ulysses
composes with (context parallelism needs FSDP2), it works through transformers' attention interface with sdpa and
flash-attention alike (context parallelism: sdpa only, and its load-balanced shards reorder tokens), and its
all-to-all moves 1/N of the activations per layer. Its limit: the language model's query heads must divide by N
(and its key/value heads divide N or by N): Qwen2.5-VL-7B (28 heads, 4 KV) takes N = 2 or 4.

What vidtune adds around the engine (no collective of its own: slicing, and torch's autograd all_gather):
- Data: the ranks of a group read the same micro-batches (`RepeatedBatches`: each batch comes N times in a row, so
  Accelerate's per-rank sharding hands it to N consecutive ranks, which are one Ulysses group); the group's other
  ranks report no samples or tokens, so the logged counts stay per sample (`CountOnce`). Accelerate's
  `UlyssesSPDataLoaderAdapter` is not used: it slices every batch tensor on dim 1, which visual tensors are not.
- Packing (`train.packing`): the micro-batch's samples are packed into one row, the sequence the group splits, each
  sample with its own positions (the packer's); DeepSpeed's micro-batch is that one row. With sdpa, Ulysses' core
  attention runs per sample, found where the gathered positions restart (`per_sample_attention`; flash-attention's
  varlen reads the same restarts itself).
- Positions on the whole sequence, then sliced: 0..T-1, or Qwen's 3-D multimodal RoPE from the model's own
  `get_rope_index` (prefixed with the text positions Ulysses gathers before attention).
- The vision tower splits too: rank i encodes share i of the frames (the family's `video_shares`); the features
  are all-gathered (autograd: each share's gradient comes back to the rank that encoded it) and merged into the
  whole sequence's embeddings, of which each rank keeps its slice. Vision memory and time per rank drop by N.
- The loss: labels are shifted on the whole (padded to a multiple of N) sequence, then sliced; each rank sums its
  slice's token losses, the loop divides the sum over ranks by the global label count (as without SP).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import torch

from vidtune.data.families import ModelFamily
from vidtune.data.packing import FLASH_KEYS, NUM_SAMPLES, NUM_TOKENS
from vidtune.train.training.loss import (
    IGNORE_INDEX,
    HeadInputCapture,
    capped,
    chunked_cross_entropy,
    logit_softcap,
    model_inputs,
)

VIDEO_KEYS = ("pixel_values_videos", "video_grid_thw")  # what a family's video_shares splits
_ORIGINAL_ATTENTION: dict[str, Callable[..., Any]] = {}  # the attention functions before Ulysses replaced them


def recipe_problem(train: Any, model: Any, data: Any) -> str | None:
    """What is wrong with a recipe's train.sequence_parallel, in one line (None: nothing)."""
    size = train.sequence_parallel
    if size < 1:
        return f"train.sequence_parallel must be >= 1, got {size}"
    if size == 1:
        return None
    if train.batch_size != 1 and not train.packing:
        return (
            "train.sequence_parallel > 1 splits one sequence at a time: set train.batch_size=1 (and "
            "grad_accum_steps), or train.packing=true to pack batch_size samples into that sequence"
        )
    if train.objective != "sft":
        return f"train.sequence_parallel > 1 trains objective sft only (not {train.objective}) for now"
    if data.streaming:
        return "train.sequence_parallel > 1 with data.streaming is not supported yet: unset it"
    if model.attn_implementation == "eager":
        return "train.sequence_parallel > 1 needs model.attn_implementation sdpa or flash_attention_2 (Ulysses)"
    return None


def parallelism_config(recipe: Any) -> Any:
    """Accelerate's ParallelismConfig for a recipe with sequence_parallel > 1 (None otherwise): DeepSpeed's Ulysses
    groups of N consecutive ranks, world / N of them (data parallel). Sequence parallelism is off in evaluation and
    generation (each rank runs its own whole samples there)."""
    size = recipe.train.sequence_parallel
    if size <= 1:
        return None
    from accelerate import ParallelismConfig
    from accelerate.utils import DeepSpeedSequenceParallelConfig
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from vidtune.train.training.config import RecipeError

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world % size:
        raise RecipeError(
            f"train.sequence_parallel={size} needs a multiple of {size} processes, {world} launched: "
            f"NUM_PROCESSES={size} launch/train.sh RECIPE launch/accelerate/zero2.yaml"
        )
    implementation = recipe.model.attn_implementation
    original = _ORIGINAL_ATTENTION.setdefault(implementation, ALL_ATTENTION_FUNCTIONS[implementation])
    if implementation == "sdpa":  # Ulysses takes the function registered now as its core attention (in prepare)
        ALL_ATTENTION_FUNCTIONS[implementation] = per_sample_attention(original)
    handler = DeepSpeedSequenceParallelConfig(
        sp_seq_length_is_variable=True, sp_attn_implementation=implementation, sp_disable_in_eval=True
    )
    return ParallelismConfig(dp_replicate_size=world // size, sp_size=size, sp_backend="deepspeed", sp_handler=handler)


def per_sample_attention(sdpa: Callable[..., Any]) -> Callable[..., Any]:
    """sdpa as Ulysses' core attention, for packed sequences: Ulysses drops every attention mask (the model built it
    for the local slice) and attends causally over the gathered sequence, which would let a packed sample attend to
    the ones before it. It hands the core the gathered position ids: where they restart, a new sample begins, and
    each sample attends causally within itself, one sdpa call per sample (no (T x T) mask: memory stays per sample,
    as flash-attention's varlen, which reads the same restarts, has it). Unpacked sequences take one call as before."""

    def attention(
        module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: Any, *args, **kwargs
    ):  # named as transformers' attention functions are: modules pass attention_mask= by keyword
        positions = kwargs.get("position_ids")
        one_row = positions is not None and query.shape[0] == 1 and query.shape[2] == positions.shape[-1]
        if attention_mask is not None or positions is None or not one_row:
            return sdpa(module, query, key, value, attention_mask, *args, **kwargs)
        starts = sample_starts(positions.reshape(-1))
        if len(starts) == 1:
            return sdpa(module, query, key, value, attention_mask, *args, **kwargs)
        ends = [*starts[1:], query.shape[2]]
        parts = [
            sdpa(module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None, *args, **kwargs)
            for a, b in zip(starts, ends, strict=True)
        ]
        return torch.cat([out for out, _ in parts], dim=1), None  # sdpa returns (B, T, heads, dim)

    return attention


def sample_starts(positions: torch.Tensor) -> list[int]:
    """Where the packed samples of one row start: index 0 and every position that does not follow its left one."""
    restarts = torch.nonzero(positions[1:] != positions[:-1] + 1).flatten() + 1
    return [0, *restarts.tolist()]


def data_parallel_size(recipe: Any, num_processes: int) -> int:
    return num_processes // max(1, recipe.train.sequence_parallel)


def group_rank(recipe: Any, process_index: int) -> int:
    """This process's rank inside its sequence-parallel group (groups are consecutive ranks, as DeepSpeed's)."""
    return process_index % max(1, recipe.train.sequence_parallel)


class RepeatedBatches:
    """A batch sampler whose every batch comes `times` in a row: sharded per rank by Accelerate, the `times`
    consecutive ranks of a sequence-parallel group get the same batches, and the groups different ones."""

    def __init__(self, batch_sampler: Any, times: int):
        self.batch_sampler = batch_sampler
        self.times = times

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batch_sampler:
            for _ in range(self.times):
                yield batch

    def __len__(self) -> int:
        return len(self.batch_sampler) * self.times

    def set_epoch(self, epoch: int) -> None:
        self.batch_sampler.set_epoch(epoch)


class CountOnce:
    """A collate function for one rank of a sequence-parallel group: only the group's first rank reports the
    batch's samples, real tokens and skipped samples (the loop sums them over every rank)."""

    def __init__(self, collate: Callable[[list[Any]], dict[str, Any]], rank_in_group: int):
        self.collate = collate
        self.rank_in_group = rank_in_group

    def __call__(self, examples: list[Any]) -> dict[str, Any]:
        batch = self.collate(examples)
        if self.rank_in_group == 0:
            if NUM_SAMPLES not in batch:  # a packed batch has its counts already
                batch[NUM_SAMPLES], batch[NUM_TOKENS] = len(batch["input_ids"]), int(batch["attention_mask"].sum())
            return batch
        batch.pop("skipped", None)
        batch[NUM_SAMPLES] = batch[NUM_TOKENS] = 0
        return batch


def split_loader_parts(recipe: Any, process_index: int, batch_sampler: Any, collate: Any) -> tuple[Any, Any]:
    """The training DataLoader's batch sampler and collate function under sequence parallelism (as given without)."""
    size = recipe.train.sequence_parallel
    if size <= 1:
        return batch_sampler, collate
    return RepeatedBatches(batch_sampler, size), CountOnce(collate, group_rank(recipe, process_index))


def next_labels(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) labels -> what each position predicts (B, T): label t + 1, IGNORE_INDEX at the end (the shift
    transformers' causal-LM loss makes, done before the sequence is split)."""
    return torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def gather_shares(local: torch.Tensor, rows: list[int], real: list[bool], rank: int, group: Any) -> torch.Tensor:
    """Every rank's feature rows (rows[i] from rank i; `local` is this rank's), in rank order, real shares only.
    torch's autograd all_gather (its backward returns each share's gradient, summed over ranks, to its encoder)
    needs equal shapes: shares are padded to the longest."""
    import torch.distributed as dist
    import torch.distributed.nn.functional as distributed_autograd

    padded = torch.nn.functional.pad(local, (0, 0, 0, max(rows) - rows[rank]))
    if dist.get_backend(group) == dist.Backend.GLOO:
        # gloo: all_gather's backward (an all-to-all made of scatters) passes group ranks where global ones are
        # expected, so it fails in any group not starting at global rank 0 (data parallel x sequence parallel).
        # Autograd all_reduce of each rank's share in its own slot (zeros elsewhere: exact) gathers the same rows;
        # its backward sums each share's gradient over the group, as all_gather's does.
        slots = torch.zeros(len(rows), *padded.shape, dtype=padded.dtype, device=padded.device)
        slots = slots.index_copy(0, torch.tensor([rank], device=padded.device), padded[None])
        parts = distributed_autograd.all_reduce(slots, group=group).unbind(0)
    else:
        with warnings.catch_warnings():  # its successor in _functional_collectives needs reduce_scatter (not in gloo)
            warnings.simplefilter("ignore", FutureWarning)
            parts = distributed_autograd.all_gather(padded, group=group)
    return torch.cat([part[:count] for part, count, keep in zip(parts, rows, real, strict=True) if keep])


def feature_rows(output: Any) -> torch.Tensor:
    """A get_*_features pooler output as (rows, hidden): a tensor (B, tokens, H) or a tuple of (tokens, H)."""
    pooled = output.pooler_output
    if isinstance(pooled, list | tuple):
        return torch.cat(list(pooled))
    return pooled.flatten(0, -2)


def encode_share(model: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """One share of the frames through the vision tower and projector: (rows, hidden)."""
    return feature_rows(model.get_video_features(**inputs, return_dict=True))


class SequenceSplitLoss:
    """The SFT objective under sequence parallelism: the summed token loss of this rank's slice of each sample.

    A forward pre-hook on the transformers model turns the whole-sequence inputs into this rank's slice: embeddings
    with every visual feature merged (the vision tower split across the group), position ids computed on the whole
    sequence; Ulysses (attention only of the language model: vision attention keeps its own function) does the rest.
    """

    def __init__(
        self,
        model: Any,
        accelerator: Any,
        family: ModelFamily,
        pad_token_id: int,
        autocast: Callable[[], AbstractContextManager[Any]],
        zero3: bool,
    ):
        import deepspeed.runtime.sequence_parallel.parallel_state_sp as groups

        self.group = groups.get_sequence_parallel_group()
        self.size = groups.get_sequence_parallel_world_size()
        self.rank = groups.get_sequence_parallel_rank()
        self.family, self.pad_token_id, self.autocast, self.zero3 = family, pad_token_id, autocast, zero3
        unwrapped = accelerator.unwrap_model(model)
        self.model = unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped
        self.head = self.model.get_output_embeddings()
        self.active = False
        if zero3 and not accelerator.state.deepspeed_plugin.deepspeed_config["zero_optimization"].get(
            "reduce_scatter", True
        ):  # ZeRO-3's all-reduce path divides by world / N for small buckets, by the world for large ones
            raise ValueError("train.sequence_parallel under ZeRO-3 needs zero_optimization.reduce_scatter on")
        route_language_attention(self.model)
        self.model.register_forward_pre_hook(self.shard_inputs, with_kwargs=True)

    # ------------------------------------------------------------------------------------------ the objective

    def padded(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Token tensors right-padded to a multiple of the group size (pad tokens, no attention, no labels; a packed
        batch's positions restart there: the padding is a segment of its own, as the packer pads). A packed batch's
        flash-attention lengths go: they describe the unpadded row (flash reads the same restarts from the gathered
        positions)."""
        out = {k: v for k, v in batch.items() if k not in FLASH_KEYS}
        extra = -batch["input_ids"].shape[1] % self.size
        if not extra:
            return out
        fill = {"input_ids": self.pad_token_id, "labels": IGNORE_INDEX}
        for key in ("input_ids", "attention_mask", "labels", *self.family.token_keys):
            if isinstance(batch.get(key), torch.Tensor):
                out[key] = torch.nn.functional.pad(batch[key], (0, extra), value=fill.get(key, 0))
        if isinstance(batch.get("position_ids"), torch.Tensor):
            positions = batch["position_ids"]
            restart = torch.arange(extra, device=positions.device).expand(*positions.shape[:-1], extra)
            out["position_ids"] = torch.cat([positions, restart], dim=-1)
        return out

    def bounds(self, length: int) -> tuple[int, int]:
        chunk = length // self.size
        return self.rank * chunk, (self.rank + 1) * chunk

    def slice_targets(self, batch: dict[str, Any]) -> torch.Tensor:
        """What this rank's slice of the (padded) batch predicts (B, T / N)."""
        low, high = self.bounds(batch["labels"].shape[1])
        return next_labels(batch["labels"])[:, low:high]

    def units(self, batch: dict[str, Any]) -> torch.Tensor:
        """Label tokens this rank's slice predicts: summed over the group, the samples' label tokens."""
        return (self.slice_targets(self.padded(batch)) != IGNORE_INDEX).sum()

    def figures(self, accelerator: Any) -> dict[str, torch.Tensor]:
        return {}

    def __call__(self, model: Any, batch: dict[str, Any]) -> torch.Tensor:
        batch = self.padded(batch)
        inputs = model_inputs(batch)
        self.active = True
        try:
            if self.zero3:  # the head is a partition outside its forward: the model's own loss (on shifted labels)
                loss = model(**inputs, labels=batch["labels"], num_items_in_batch=1, use_cache=False).loss
                return self.gradient_per_group(loss)
            with HeadInputCapture(self.head) as capture:
                model(**inputs, use_cache=False)
        finally:
            self.active = False
        hidden, targets = capture.hidden, self.slice_targets(batch)
        if hidden is None:
            raise RuntimeError("the model's forward never called its language head (get_output_embeddings())")
        keep = targets != IGNORE_INDEX  # a boolean pick: one host sync per micro-batch, small next to SP's own
        with self.autocast():
            summed = chunked_cross_entropy(capped(self.head, logit_softcap(self.model)), hidden[keep], targets[keep])
            if not keep.any():  # a slice without labels (a prompt's): a trained head still gets its 0 gradient,
                summed = summed + 0.0 * self.head(hidden[:, :1]).float().sum()  # DeepSpeed reduces alike everywhere
        # Every rank's backward must reach every layer (Ulysses' all-to-alls pair up across the group), also a
        # slice without labels.
        return self.gradient_per_group(summed + 0.0 * hidden.sum())

    def gradient_per_group(self, summed: torch.Tensor) -> torch.Tensor:
        """The loop scales every rank's loss for gradients averaged over all ranks. DeepSpeed 0.19's ZeRO-1/2 divide
        by world / N instead (summing within a sequence-parallel group, whose ranks' gradients are parts of one
        sample's): there the loss keeps its value but passes 1/N of its gradient. Its ZeRO-3 reduce-scatter
        divides by the world (measured: the gradient norm then equals the 1-process run's as it is)."""
        if self.zero3:
            return summed
        return summed / self.size + (summed - summed / self.size).detach()

    # ------------------------------------------------------------------------------------- the model's inputs

    def shard_inputs(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Forward pre-hook: the whole sequence's inputs -> this rank's slice (training forwards of this objective)."""
        if not self.active or not module.training:
            return None
        if args:
            raise RuntimeError("sequence parallelism expects the model's inputs as keyword arguments")
        inputs = dict(kwargs)
        input_ids = inputs.pop("input_ids")
        low, high = self.bounds(input_ids.shape[1])
        packed = inputs.get("position_ids")  # a packed batch: each sample's own positions (data/packing.py)
        positions = packed if packed is not None else self.positions(input_ids, inputs)
        embeddings = self.embeddings(input_ids, inputs)
        for key in (*self.family.visual_keys, "second_per_grid_ts", "inputs_embeds"):
            inputs.pop(key, None)
        inputs["inputs_embeds"] = embeddings[:, low:high]
        inputs["position_ids"] = positions[..., low:high]
        inputs["attention_mask"] = None  # Ulysses attends causally over the gathered sequence (right padding)
        for key in self.family.token_keys:
            if isinstance(inputs.get(key), torch.Tensor):
                inputs[key] = inputs[key][:, low:high]
        if inputs.get("labels") is not None:
            targets = next_labels(inputs["labels"])[:, low:high]
            inputs["labels"], inputs["shift_labels"] = targets, targets  # already shifted: the loss must not shift
        return (), inputs

    def positions(self, input_ids: torch.Tensor, inputs: dict[str, Any]) -> torch.Tensor:
        """Position ids of the whole sequence: (B, T), or for multimodal RoPE (4, B, T) = text positions (which
        Ulysses gathers for its attention) over the model's own 3-D positions (get_rope_index)."""
        batch_size, length = input_ids.shape
        text = torch.arange(length, device=input_ids.device).expand(batch_size, length)
        rope_index = getattr(self.model.model, "get_rope_index", None)
        if rope_index is None:
            return text
        grids = {k: inputs.get(k) for k in ("image_grid_thw", "video_grid_thw")}
        if inputs.get("mm_token_type_ids") is None or all(g is None for g in grids.values()):
            rope = text[None].expand(3, batch_size, length)  # what the model does for text alone
        else:
            rope, _ = rope_index(
                input_ids,
                mm_token_type_ids=inputs["mm_token_type_ids"],
                second_per_grid_ts=inputs.get("second_per_grid_ts"),
                attention_mask=inputs.get("attention_mask"),
                **grids,
            )
        return torch.cat([text[None], rope.to(text.device)])

    def embeddings(self, input_ids: torch.Tensor, inputs: dict[str, Any]) -> torch.Tensor:
        """The whole sequence's input embeddings with image and video features in their placeholders, as the
        model's own forward merges them; video frames are encoded a share per rank and gathered."""
        config = self.model.config
        embeddings = self.model.get_input_embeddings()(input_ids)
        image_inputs = {
            k: inputs[k] for k in self.family.visual_keys if k not in VIDEO_KEYS and inputs.get(k) is not None
        }
        if image_inputs:  # images are few frames: every rank encodes them all
            features = feature_rows(self.model.get_image_features(**image_inputs, return_dict=True))
            embeddings = self.merge(embeddings, input_ids == image_token(config), features)
        if inputs.get("pixel_values_videos") is not None:
            shares = self.family.video_shares(inputs, self.size)
            local = encode_share(self.model, shares[self.rank].inputs)
            rows = [len(local) * share.weight // shares[self.rank].weight for share in shares]
            features = gather_shares(local, rows, [s.real for s in shares], self.rank, self.group)
            embeddings = self.merge(embeddings, input_ids == video_token(config), features)
        return embeddings

    @staticmethod
    def merge(embeddings: torch.Tensor, mask: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        if int(mask.sum()) != len(features):
            raise ValueError(f"visual features and placeholder tokens do not match: {len(features)} vs {mask.sum()}")
        return embeddings.masked_scatter(mask[..., None], features.to(embeddings.dtype))


def image_token(config: Any) -> int:
    return getattr(config, "image_token_id", None) or config.image_token_index


def video_token(config: Any) -> int:
    return getattr(config, "video_token_id", None) or config.video_token_index


def route_language_attention(model: Any) -> None:
    """Ulysses replaces the attention function for every module that uses it, the vision tower's too, whose
    frames are not split along the sequence: send only the language model's attention layers through it."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    implementation = model.config.get_text_config()._attn_implementation
    original = _ORIGINAL_ATTENTION.get(implementation)
    ulysses = ALL_ATTENTION_FUNCTIONS[implementation]
    if original is None or ulysses is original:
        raise RuntimeError(f"Ulysses did not replace the {implementation} attention function")
    language = getattr(model.model, "language_model", None) or model.get_decoder()
    language_modules = {id(module) for module in language.modules()}

    def attention(module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        function = ulysses if id(module) in language_modules else original
        return function(module, *args, **kwargs)

    ALL_ATTENTION_FUNCTIONS[implementation] = attention
