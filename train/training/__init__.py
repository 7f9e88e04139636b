"""The training run, read top to bottom in loop.py: setup -> (resume) -> train -> save -> cleanup.

config.py       typed, strict recipes (defaults, YAML, `key.sub=value` overrides, validation)
model.py        load a checkpoint, choose what trains (LoRA / full, projector, vision tower), audit it
quantization.py QLoRA: the language model loaded 4-/8-bit by bitsandbytes, vision tower and projector left as they are
memory_plan.py  --dry-run's per-GPU memory plan: weights, gradients, optimizer states, activations (arithmetic)
build.py        a run's parts from its recipe: model + processor, data loaders, optimizer and scheduler
loop.py         the Accelerate loop: micro-batches, loss scaling, steps, eval, checkpoints, final save
loss.py         the summed token loss from hidden states in chunks (or Liger), never the full logits
held_out.py     held-out scores during training (eval loss, generation metrics); batches to the device
checkpoint.py   checkpoints written atomically, verified, resumed only when the run matches, loaded safely
resume.py       resuming from the newest checkpoint that loads; changed learning rate / weight decay applied
distributed.py  the Accelerator, DeepSpeed settings, ZeRO-3 vision lockstep, gathering sharded weights
sharding.py     FSDP2 through Accelerate's plugin: lockstep, the same backward order, sharded saves, gathered exports
sequence_split.py  sequence parallelism (DeepSpeed Ulysses): one sample's sequence and frames shared by a group
cpu_launch.py   GPU launch configs on machines without CUDA (the only private-API patches, asserted)
preemption.py   SIGTERM / SIGINT: finish the step, checkpoint, exit 128+signal
health.py       bad samples met while training, non-finite losses
outputs.py      what a finished run leaves: adapter or model, processor, recipe, vidtune.json
tracking.py     metrics.jsonl, console lines and wandb
progress.py     the live progress bar on a terminal (step of total, samples per second, loss, ETA), step lines otherwise
flops.py        model FLOPs of a step per family (LoRA/full, attention, vision tower) and GPU peaks, for MFU
"""
