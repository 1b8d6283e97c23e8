"""Structured channel pruning: the pruner mechanics on torch-pruning's dependency graph (`pruner`), the
pruning loop (`loop`), the stage allocation search (`allocation`), torch-pruning's concat index mapping in
linear time (`concat`) and the prune stage with its KD fine-tuning (`stage`)."""
