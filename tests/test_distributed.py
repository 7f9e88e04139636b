"""DDP and DeepSpeed ZeRO-2/3 with 2 CPU processes (gloo, DS_ACCELERATOR=cpu), launched with the README's command
(launch/train.sh + launch/accelerate/*.yaml), on a corpus mixing clips of 2/4/6 frames, images and text-only rows.

Every run asserts the world size and engine it actually got: Accelerate without CUDA would otherwise silently run
each process alone."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import RUN_FAMILIES
from vidtune.train.training.config import recipe_to_yaml
from vidtune.train.training.tracking import read_metrics

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def mixed_recipe(model: Path, corpus: Path, output: Path, path: Path, *overrides: str) -> Path:
    from vidtune.train.training.config import load_recipe

    recipe = load_recipe(
        None,
        [
            f"model.name_or_path={model}",
            f"data.sources=[{{path: {corpus}}}]",
            "data.sampling.num_frames=8",
            "data.sampling.fps=2.0",  # 1-3 s clips -> 2, 4 or 6 frames
            "data.max_length=160",
            "data.num_workers=0",
            f"train.output_dir={output}",
            "train.max_steps=4",
            "train.batch_size=2",
            "train.learning_rate=1e-2",
            "train.warmup_ratio=0",
            "train.log_every_steps=1",
            "train.group_by_length=false",
            "finetune.lora.dropout=0",
            "finetune.train_projector=true",
            "logging.report_to=none",
            *overrides,
        ],
    )
    path.write_text(recipe_to_yaml(recipe))
    return path


def launch(recipe: Path, config: str, *overrides: str, wait: bool = True, **options) -> subprocess.CompletedProcess:
    """launch_once, again on a new port when the one picked here was taken before the rendezvous bound it (by a
    second copy of the suite, or as any process's ephemeral port): nothing has been written by then."""
    for _ in range(3):
        result = launch_once(recipe, config, *overrides, wait=wait, **options)
        printed = f"{result.stdout}{result.stderr}".lower() if wait else ""
        if not wait or result.returncode == 0 or "address already in use" not in printed:
            return result
    return result


def launch_once(
    recipe: Path,
    config: str,
    *overrides: str,
    env: dict | None = None,
    processes: int = 2,
    wait: bool = True,
    fault: str | None = None,
) -> subprocess.CompletedProcess | subprocess.Popen:
    """The README's multi-process command: launch/train.sh RECIPE CONFIG [overrides] (with a fault: accelerate
    launch of tests/faults.py, which train.sh's `accelerate launch` equals but for the module)."""
    environment = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",  # this venv's python/accelerate, as activated
        "NUM_PROCESSES": str(processes),
        "MAIN_PROCESS_PORT": str(free_port()),
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        "TQDM_DISABLE": "1",
        **(env or {}),
    }
    command = ["bash", str(REPO / "launch" / "train.sh"), str(recipe), str(REPO / "launch" / "accelerate" / config)]
    if fault:  # the same launch with tests/faults.py in place of the CLI module (it patches, then runs the CLI)
        command = [
            "accelerate",
            "launch",
            "--config_file",
            str(REPO / "launch" / "accelerate" / config),
            "--num_processes",
            str(processes),
            "--main_process_port",
            environment["MAIN_PROCESS_PORT"],
            "-m",
            "tests.faults",
            fault,
            "train",
            str(recipe),
        ]
    command += overrides
    if not wait:
        return subprocess.Popen(
            command, cwd=REPO, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
    return subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=900)


def losses(output: Path) -> list[float]:
    return [m["train/loss"] for m in sorted(read_metrics(output), key=lambda m: m["step"]) if "train/loss" in m]


def engine(output: Path) -> dict:
    return json.loads((output / "vidtune.json").read_text())["distributed"]


def assert_two_processes_matched(output: Path, reference: Path, distributed_type: str, stage: int) -> None:
    """The run used 2 processes with the engine asked for, and logged the 1-process run's losses (relative 1e-4)."""
    assert engine(output) == {"num_processes": 2, "distributed_type": distributed_type, "zero_stage": stage}
    ours, theirs = losses(output), losses(reference)
    assert len(ours) == len(theirs) == 4
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(theirs), rtol=1e-4, atol=0)


@pytest.fixture(scope="module")
def reference(tiny_model_dir, mixed_corpus, tmp_path_factory):
    """One process, the same global batch (2 samples x 2 micro-batches per step)."""
    from vidtune.train.training.config import load_recipe
    from vidtune.train.training.loop import train

    root = tmp_path_factory.mktemp("reference")
    path = mixed_recipe(tiny_model_dir, mixed_corpus, root / "out", root / "recipe.yaml", "train.grad_accum_steps=2")
    train(load_recipe(path))
    return root / "out"


@pytest.fixture(scope="module")
def recipe(tiny_model_dir, mixed_corpus, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("distributed")
    return mixed_recipe(tiny_model_dir, mixed_corpus, root / "unused", root / "recipe.yaml"), root


@pytest.mark.parametrize(
    ("config", "distributed_type", "stage"),
    [("ddp.yaml", "MULTI_CPU", 0), ("zero2.yaml", "DEEPSPEED", 2), ("zero3.yaml", "DEEPSPEED", 3)],
)
def test_two_processes_match_one_process_losses_through_a_kill_and_resume(
    reference, recipe, config, distributed_type, stage
):
    """Two processes log the 1-process run's losses at every step (relative 1e-4). On the way, rank 0 is killed
    (SIGKILL) at the first micro-batch after the step-2 checkpoint; relaunched, the run continues at step 2: steps 1-2
    come from the first launch, 3-4 from the resumed one, and all four match the uninterrupted 1-process run."""
    path, root = recipe
    output = root / config.replace(".yaml", "")
    overrides = (f"train.output_dir={output}", "train.save_every_steps=2")
    killed = launch(path, config, *overrides, fault="kill@2.0")
    assert killed.returncode != 0 and not (output / "vidtune.json").exists()
    assert [p.name for p in (output / "checkpoints").glob("step_*")] == ["step_00000002"]
    resumed = launch(path, config, *overrides)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout and "step_00000002" in resumed.stdout
    assert "shm_comm" not in killed.stdout + resumed.stdout  # no JIT build of DeepSpeed's CPU all-reduce (~50 s)
    assert_two_processes_matched(output, reference, distributed_type, stage)
    if stage == 3:
        assert_loaded_partitioned(resumed.stdout, output, reference)


def assert_loaded_partitioned(stdout: str, output: Path, reference: Path) -> None:
    """ZeRO-3 loads inside deepspeed.zero.Init: right after loading, each rank holds about half of the weights
    (DeepSpeed pads each partition to the world size); the audit still counts the whole model."""
    # (the ranks print at once: their lines may run into each other)
    held = re.findall(r"rank (\d): parameters held on this rank after loading: ([\d,]+) of ([\d,]+)", stdout)
    assert sorted(rank for rank, _, _ in held) == ["0", "1"], stdout[-3000:]
    single = json.loads((reference / "trainable_parameters.json").read_text())
    for _, mine, total in held:
        mine, total = int(mine.replace(",", "")), int(total.replace(",", ""))
        assert total == single["total"] - sum(single["lora"].values())  # the base model, before LoRA
        assert 0.49 < mine / total < 0.52
    assert json.loads((output / "trainable_parameters.json").read_text()) == single


def adapter(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def assert_adapters_equal(sharded: dict[str, torch.Tensor], single: dict[str, torch.Tensor]) -> None:
    """The adapter gathered from ZeRO-3 shards holds the 1-process run's weights, every one non-empty."""
    assert sharded.keys() == single.keys() and any("lora_A" in k for k in sharded)
    for key, tensor in sharded.items():
        assert tensor.numel() > 0 and tensor.shape == single[key].shape, key
        # Same values up to float summation order, which Adam can amplify to ~1e-5 on tiny gradients (lr 1e-2).
        torch.testing.assert_close(tensor, single[key], rtol=1e-3, atol=1e-4)


def test_zero3_adapter_is_gathered_equal_and_generates_the_same_tokens(reference, recipe, tiny_model_dir, mixed_corpus):
    from vidtune.train.generation.infer import generate, load_for_inference, video_question

    _, root = recipe
    sharded, single = adapter(root / "zero3"), adapter(reference)
    assert_adapters_equal(sharded, single)
    assert any("multi_modal_projector" in k for k in sharded)  # the projector, trained fully
    prompts = [video_question(str(mixed_corpus.parent / f"clip{i}.mp4"), "Describe this video.") for i in (0, 1, 4)]
    assert generate(load_for_inference(str(root / "zero3")), prompts, 6) == generate(
        load_for_inference(str(reference)), prompts, 6
    )


@pytest.mark.parametrize("family", [name for name in RUN_FAMILIES if name != "llava_next_video"])
def test_zero3_packed_matches_one_unpacked_process_for_every_other_family(family, family_kits, mixed_corpus, tmp_path):
    """Each other family on the same mix of clips, images and text-only rows, packed (train.packing, where the
    family packs) under 2-process ZeRO-3: no hang, the 1-process unpacked run's losses at every step (the same
    global batch), and an equal, non-empty adapter (projector/merger trained fully). At seed 0 the ranks'
    micro-batches include video + text beside image + text (each rank runs the other's path blank), two images of
    different sizes, and a 6-frame 112x56 clip with a 2-frame 64x48 one (Qwen: two patch grids, per-sample
    multimodal RoPE positions). One launch per family, no kill: the LLaVA-NeXT-Video cases above cover resuming
    under ZeRO-3. (One run checks both ZeRO-3 on the mix and packing under ZeRO-3: a suite-time budget.)"""
    from vidtune.train.training.config import load_recipe
    from vidtune.train.training.loop import train

    kit = family_kits(family)
    one = mixed_recipe(kit.model_dir, mixed_corpus, tmp_path / "one", tmp_path / "one.yaml", "train.grad_accum_steps=2")
    train(load_recipe(one))
    two = mixed_recipe(kit.model_dir, mixed_corpus, tmp_path / "two", tmp_path / "two.yaml")
    result = launch(two, "zero3.yaml", *(["train.packing=true"] if kit.family.supports_packing else []))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert_two_processes_matched(tmp_path / "two", tmp_path / "one", "DEEPSPEED", 3)
    sharded = adapter(tmp_path / "two")
    assert_adapters_equal(sharded, adapter(tmp_path / "one"))
    assert any(k.startswith(f"base_model.model.{kit.family.projector_prefix}") for k in sharded), sorted(sharded)


def test_zero3_full_fine_tuning_saves_the_checkpoints_own_weight_names(family_kits, mixed_corpus, tmp_path):
    """Full fine-tuning under ZeRO-3 saves the weights under the names of the checkpoint it started from, and
    from_pretrained loads the folder whole (nothing missing, nothing unexpected). transformers 5.25's ZeRO-3 load
    kept a renaming it had not used, and the save wrote Qwen2.5-VL's language model as `model.model.layers.*`:
    a folder that loads with a randomly initialised language model."""
    from safetensors import safe_open

    from vidtune.train.training.model import model_class

    kit = family_kits("qwen2_5_vl")
    path = mixed_recipe(
        kit.model_dir, mixed_corpus, tmp_path / "out", tmp_path / "r.yaml", "finetune.mode=full", "train.max_steps=1"
    )
    result = launch(path, "zero3.yaml")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    def names(folder: Path) -> set[str]:
        with safe_open(str(folder / "model.safetensors"), "pt") as weights:
            return set(weights.keys())

    assert names(tmp_path / "out") == names(kit.model_dir)
    _, info = model_class(kit.family).from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info


def test_streamed_corpus_is_split_across_ranks(recipe):
    """A streamed corpus (no length known) with DDP: each rank reads its own shard, forever, for max_steps."""
    path, root = recipe
    output = root / "streamed"
    result = launch(path, "ddp.yaml", f"train.output_dir={output}", "data.streaming=true", "train.max_steps=6")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert engine(output)["num_processes"] == 2
    assert len(losses(output)) == 6 and all(loss == loss for loss in losses(output))  # 6 steps, no NaN


def test_two_nodes_simulated_on_one_machine(recipe, reference):
    """Two launches as SLURM would start them: node ranks 0 and 1, one process each, rendezvous on 127.0.0.1."""
    path, root = recipe
    output = root / "two-nodes"
    port = str(free_port())
    nodes = [
        launch(
            path,
            "zero2.yaml",
            f"train.output_dir={output}",
            wait=False,
            env={
                "NUM_MACHINES": "2",
                "MACHINE_RANK": str(rank),
                "MAIN_PROCESS_IP": "127.0.0.1",
                "MAIN_PROCESS_PORT": port,
            },
        )
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=900)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert_two_processes_matched(output, reference, "DEEPSPEED", 2)


FAKE_SRUN = """#!/usr/bin/env bash
# Test stand-in for srun: runs the task once per node of the allocation, here, with that node's SLURM_NODEID.
while [[ $1 == --* ]]; do shift; done
pids=()
for ((node = 0; node < SLURM_NNODES; node++)); do SLURM_NODEID=$node "$@" & pids+=($!); done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
exit $status
"""


def test_slurm_script_on_two_simulated_nodes(recipe, reference, tmp_path):
    """launch/slurm/train.sbatch as SLURM runs it (the scheduler's srun/scontrol stood in for; training is real):
    node rank, rendezvous address and world size come from SLURM's variables."""
    path, root = recipe
    output = root / "slurm"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "scontrol").write_text("#!/usr/bin/env bash\necho 127.0.0.1\n")
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
        "SLURM_NNODES": "2",
        "SLURM_GPUS_ON_NODE": "1",
        "SLURM_JOB_NODELIST": "node[1-2]",
        "SLURM_JOB_ID": str(free_port()),
        "SLURM_SUBMIT_DIR": str(REPO),
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        "TQDM_DISABLE": "1",
    }
    env.pop("MAIN_PROCESS_PORT", None)
    result = subprocess.run(
        [
            "bash",
            str(REPO / "launch/slurm/train.sbatch"),
            str(path),
            str(REPO / "launch/accelerate/zero3.yaml"),
            f"train.output_dir={output}",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert_two_processes_matched(output, reference, "DEEPSPEED", 3)


def test_plain_torchrun_ddp(recipe, reference):
    """The README's torchrun command (DDP without an Accelerate config)."""
    path, root = recipe
    output = root / "torchrun"
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "OMP_NUM_THREADS": "1",
        "TQDM_DISABLE": "1",
    }
    result = subprocess.run(
        [
            "torchrun",
            "--standalone",  # a free rendezvous port, found by torchrun itself (29500 clashes with a second job)
            "--nproc_per_node",
            "2",
            "-m",
            "vidtune.train.cli",
            "train",
            str(path),
            f"train.output_dir={output}",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert_two_processes_matched(output, reference, "MULTI_CPU", 0)
