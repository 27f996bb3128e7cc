"""Experts and the library where they live."""

from moerge.experts.expert import Expert, ExpertMetadata, LoraModule

__all__ = ["Expert", "ExpertMetadata", "LoraModule"]
