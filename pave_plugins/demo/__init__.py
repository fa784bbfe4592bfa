"""``pave demo``: a tiny end-to-end run in seconds (:mod:`.run`) and the folder it leaves for the
README's other commands (:mod:`.folder`: tokenizer, calibration data, recipes, configs, benchmark inputs)."""

from .run import DemoResult, format_result, merge_with_mergekit, run_demo

__all__ = ["DemoResult", "format_result", "merge_with_mergekit", "run_demo"]
