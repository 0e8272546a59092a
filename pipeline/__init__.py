"""hllm-pipeline: HLLM (hierarchical LLMs for sequential recommendation) as an offline two-stage pipeline."""

__version__ = "0.1.0"
