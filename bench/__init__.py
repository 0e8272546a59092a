"""Benchmarks behind `hllm-pipeline bench`: each writes JSON under bench/results/ naming the machine it ran on."""
