"""Calibrated ternary post-training quantization (PT-BitNet-style, two stages, no training).

    from ternlm.ptq import PTBitNetConfig, calibration_ids, ptbitnet_quantize
    ids = calibration_ids(tok, text, n_tokens=16384, seq_len=512)
    record = ptbitnet_quantize(model, ids, PTBitNetConfig())
"""

from ternlm.ptq.calibration import calibration_ids, capture_block_inputs, run_block
from ternlm.ptq.config import PTBitNetConfig
from ternlm.ptq.quantize import apply_transform, collect_hessians, ptbitnet_quantize
from ternlm.ptq.reconstruct import FakeTernaryLinear
from ternlm.ptq.rounding import absmean_grouped, quantize_layer

__all__ = ["PTBitNetConfig", "calibration_ids", "capture_block_inputs", "run_block", "ptbitnet_quantize",
           "apply_transform", "collect_hessians", "FakeTernaryLinear", "absmean_grouped", "quantize_layer"]
