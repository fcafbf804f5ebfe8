"""Graph passes, one per module (``verb_object.py`` defines ``verb_object``), and the runner."""

from nmgraph.passes.runner import PassResult, run_passes

__all__ = ["PassResult", "run_passes"]
