"""Training objectives, one module each: what a batch holds, how its loss is computed, what it logs.

The loop calls the objective the recipe names (`train.objective`) through one interface (`Objective`): the summed
loss of a micro-batch, the units it is averaged over (label tokens, pairs, completions), and its own figures.
"""
