"""Quantize checkpoints larger than memory: a size plan from headers, then block-by-block streaming.

    from ternlm.streaming import make_plan, stream_quantize
    print(make_plan("model-dir").table())
    stream_quantize("model-dir", "out", QuantizeConfig(), resume=True)
    stream_quantize("dir-with.gguf", "out", QuantizeConfig(method="pt-bitnet", calib="wiki.valid.raw"))

absmean reads one tensor at a time (``streaming.quantize``); pt-bitnet holds one float32 block and
the calibration activations (``streaming.ptbitnet``); GGUF files are dequantized one tensor at a
time (``streaming.gguf_source``).
"""

from ternlm.streaming.plan import SizePlan, make_plan
from ternlm.streaming.quantize import stream_quantize

__all__ = ["SizePlan", "make_plan", "stream_quantize"]
