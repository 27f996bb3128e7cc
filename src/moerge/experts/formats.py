"""File names of an expert folder (PEFT's, plus moerge's metadata and dense deltas)."""

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
DENSE_WEIGHTS = "delta_model.safetensors"
METADATA_FILE = "moerge_expert.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
PEFT_PREFIX = "base_model.model."
FORMAT_VERSION = 1  # of moerge-library.json and moerge_expert.json
# the files an expert folder may hold besides METADATA_FILE (the keys of its checksums)
EXPERT_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, DENSE_WEIGHTS)
