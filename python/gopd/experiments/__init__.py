"""Experiments on real models: the demo (`gopd demo`) and the merge experiment (`gopd experiment merge`)."""
