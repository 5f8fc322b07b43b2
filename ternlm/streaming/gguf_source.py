"""Read a float or k-quant GGUF file one tensor at a time, under Hugging Face tensor names.

``GGUFFiles`` offers what ``SourceFiles`` offers the streaming quantizer (``entries``, ``get``,
``get_cast``, ``row_blocks``), so a GGUF model streams like a safetensors directory. The header is parsed by
gguf-py; names map to the Hugging Face model's through transformers' own GGUF tables
(``get_gguf_hf_weights_map``), and each tensor goes through transformers' per-architecture
processor (Llama's q/k un-permutation, GPT-2's transposes), so a tensor equals what
``from_pretrained(..., gguf_file=...)`` loads, bit for bit. Tensor bytes are read with plain file
reads, one tensor at a time, and dequantized by gguf-py: the file is never mapped whole, so the
process holds one tensor, not the checkpoint.

Mixture-of-experts GGUFs (whose expert tensors transformers splits or merges across names) are
refused here; they load through the in-memory path.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ternlm.errors import TernlmError

_MOE_PROCESSORS = ("Qwen2MoeTensorProcessor", "GptOssTensorProcessor", "MiniMaxM2TensorProcessor")


@dataclass(frozen=True)
class GGUFEntry:
    name: str            # Hugging Face name
    gguf_name: str
    file: Path
    dtype: str           # what ``get`` returns, as a safetensors dtype name (dequantized: F32)
    shape: tuple         # the raw tensor's numpy shape in the file
    start: int           # absolute byte range in the file
    end: int
    tensor_type: object  # gguf.GGMLQuantizationType
    np_dtype: object

    @property
    def nbytes(self) -> int:
        return self.end - self.start


class GGUFFiles:
    """The tensors of one GGUF file, by Hugging Face name, for a meta-device ``model`` of its config."""

    def __init__(self, path: str | Path, model):
        from gguf import GGUFReader
        from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, get_gguf_hf_weights_map

        self.path = Path(path).expanduser()
        self.directory = self.path.parent
        self.files = [self.path]
        try:
            reader = GGUFReader(str(self.path))
            arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
        except Exception as e:
            raise TernlmError(f"{self.path} is not a readable GGUF file (truncated or corrupt): {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}") from None
        cls = TENSOR_PROCESSORS.get(arch)
        if cls is not None and cls.__name__ in _MOE_PROCESSORS:
            raise TernlmError(f"streaming does not read {arch} GGUF files (mixture-of-experts tensors); "
                              f"quantize it with --no-stream")
        from transformers.modeling_gguf_pytorch_utils import TensorProcessor

        # the processors read head counts under their Hugging Face names: the model's config has them
        self.processor = (cls or TensorProcessor)(config=model.config.to_dict())
        try:
            to_hf = get_gguf_hf_weights_map(model, self.processor)
        except Exception as e:
            raise TernlmError(f"cannot map the tensor names of {self.path} ({arch}): {type(e).__name__}") from None
        self._to_hf = to_hf
        size = self.path.stat().st_size
        self.entries: dict[str, GGUFEntry] = {}
        for t in reader.tensors:
            name = to_hf.get(t.name)
            if t.name == "output.weight" and type(self.processor).__name__ == "GPT2TensorProcessor":
                name = "lm_head.weight"  # GPT-2's processor renames the head itself
            if name is None:
                continue
            start = int(t.data_offset)
            e = GGUFEntry(name, t.name, self.path, "F32", tuple(t.data.shape), start, start + int(t.n_bytes),
                          t.tensor_type, t.data.dtype)
            if e.end > size:
                raise TernlmError(f"{self.path} is truncated: tensor {t.name} ends at byte {e.end}, "
                                  f"the file has {size}")
            self.entries[name] = e
        if not self.entries:
            raise TernlmError(f"no tensor of {self.path} maps onto the {type(model).__name__} architecture")

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def get(self, name: str) -> torch.Tensor:
        """One tensor, dequantized and processed as transformers' GGUF loader does, as float32."""
        from gguf.quants import dequantize

        e = self.entries[name]
        raw = np.empty(e.shape, dtype=e.np_dtype)
        with open(e.file, "rb") as f:
            f.seek(e.start)
            got = f.readinto(memoryview(raw.reshape(-1).view(np.uint8)))
        if got != e.nbytes:
            raise TernlmError(f"{e.file} is truncated: tensor {e.gguf_name} ends early")
        weights = dequantize(raw, e.tensor_type)
        parsed = {"tensors": {}}
        result = self.processor.process(weights=weights, name=e.gguf_name, tensor_key_mapping=self._to_hf,
                                        parsed_parameters=parsed)
        out = parsed["tensors"].get(name) if result.name is None else torch.from_numpy(np.copy(result.weights))
        if out is None:
            raise TernlmError(f"internal: the GGUF processor dropped {e.gguf_name}")
        return out.to(torch.float32)

    def get_cast(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        return self.get(name).to(dtype)

    def row_blocks(self, name: str, dtype: torch.dtype):
        """``SourceFiles.row_blocks``: one block, the whole tensor (a GGUF tensor is dequantized and
        processed whole)."""
        yield 0, self.get_cast(name, dtype)

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())
