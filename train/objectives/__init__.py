"""Training objectives, one module each: what a batch holds, how its loss is computed, what it logs.

The loop calls the objective the recipe names (`train.objective`) through one interface (`Objective`): the summed
loss of a micro-batch, the units it is averaged over (label tokens, pairs, completions), and its own figures.

base.py      the Objective interface; per-sequence log-probabilities from hidden states in chunks (no full logits)
settings.py  `train.objective`, `train.dpo.*`, `train.grpo.*`: the recipe settings, validated in one place
select.py    the objective a recipe names, and the examples and batches it needs
sft.py       supervised fine-tuning: summed answer-token loss over the step's label tokens
dpo.py       DPO on (chosen, rejected) pairs, measured against the reference model
reference.py the reference: LoRA's adapter disabled, or under full fine-tuning a frozen copy (ZeRO-3 partitioned)
grpo.py      GRPO: G sampled completions per prompt, group-normalised rewards, clipped token loss, optional KL
rewards.py   verifiable rewards by name (choice, exact, ...) or a user's module:function
"""
