"""The layer both stages stand on: the on-disk artifacts (corpus readers, packed instances, tokenizers, the
logits store, manifests) and the shared infrastructure (errors, paths, locks, the Hydra command line, the one
forward rule). ``distill`` imports from ``refine`` only through this package."""
