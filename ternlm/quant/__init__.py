"""Pure quantization math on tensors: no modules, no state."""
