"""PTBitNetConfig: the settings of calibrated ternary post-training quantization."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar, Union

from ternlm.config import FORMATS
from ternlm.errors import TernlmError

PTQ_LOG = "ternlm_ptq.json"  # the record of a pt-bitnet run, saved beside its checkpoint


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise TernlmError(msg)


@dataclass
class PTBitNetConfig:
    """Two-stage PT-BitNet-style ternary PTQ (no training of the weights).

    Stage 1 (``transform``): function-preserving per-channel scale migration (norm -> linears,
        v -> o, up -> down), folded into the stored weights.
    Stage 2, per block in order: GPTQ-style ``error_feedback`` rounding over the input Hessian
        with least-squares group scales (``refit_iters`` alternations), then ``reconstruct``:
        Adam on the block's continuous parameters (log group scales, norm weights, biases) so the
        quantized block matches the full-precision block's output.

    group_size: scales per ``group_size`` consecutive inputs of a row; the scale tensor is
        (out, ceil(in / group_size)) and the last group may be partial.
    damp: added to diag(H) as a fraction of its mean.
    act_bits: None (float activations, W1.58A16) or 8 (per-token int8, W1.58A8), used during
        calibration and by the packed layers.
    """

    method: ClassVar[str] = "ptbitnet"
    calib_tokens: int = 8192
    seq_len: int = 512
    group_size: int = 128
    transform: bool = True
    error_feedback: bool = True
    reconstruct: bool = True
    reconstruct_steps: int = 32
    reconstruct_batch: int = 2
    lr: float = 5e-3
    damp: float = 0.01
    block_cols: int = 128
    refit_iters: int = 1
    sequential: bool = True
    seed: int = 0
    act_bits: Union[int, None] = None
    fmt: str = "2bit"

    def __post_init__(self):
        _check(self.seq_len >= 2, f"seq_len must be >= 2, got {self.seq_len}")
        _check(self.calib_tokens >= self.seq_len,
               f"calib_tokens ({self.calib_tokens}) must be >= seq_len ({self.seq_len})")
        _check(self.group_size >= 1, f"group_size must be >= 1, got {self.group_size}")
        _check(self.reconstruct_steps >= 0, f"reconstruct_steps must be >= 0, got {self.reconstruct_steps}")
        _check(self.reconstruct_batch >= 1, f"reconstruct_batch must be >= 1, got {self.reconstruct_batch}")
        _check(self.lr > 0, f"lr must be positive, got {self.lr}")
        _check(0 <= self.damp < 1, f"damp must be in [0, 1), got {self.damp}")
        _check(self.block_cols >= 1, f"block_cols must be >= 1, got {self.block_cols}")
        _check(self.refit_iters >= 0, f"refit_iters must be >= 0, got {self.refit_iters}")
        _check(self.act_bits in (None, 8), f"act_bits must be None or 8, got {self.act_bits!r}")
        _check(self.fmt in FORMATS, f"unknown packed format {self.fmt!r}; choose one of {', '.join(FORMATS)}")

    @property
    def n_seq(self) -> int:
        """Calibration sequences: calib_tokens rounded down to whole sequences."""
        return self.calib_tokens // self.seq_len

    def bits_per_weight(self, scale_bits: int = 32) -> float:
        """2-bit codes plus one ``scale_bits`` scale per group (partial groups ignored)."""
        return 2.0 + scale_bits / self.group_size

    def to_dict(self) -> dict:
        return {"method": self.method, **asdict(self)}
