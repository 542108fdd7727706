"""Weight-only quantization of Mixtral's expert matrices.

Offline, ``quantize(w, spec)`` turns an ``nn.Linear`` weight ``[out_features, in_features]`` into
a ``QuantizedTensor`` whose parts are written to safetensors (``state_dict``) and read back
(``from_state_dict``, which checks every part's shape and dtype). At run time ``QuantLinear``
holds the parts and multiplies through ``kernels.matmul``, which picks the fastest correct path
for the device; every fast path has a plain torch reference (``reference_matmul``).

Formats (see ``formats``): ``nf4`` (4-bit NormalFloat, block 64, double-quantized block scales,
bitsandbytes' own layout) and ``int8`` (symmetric, block-wise absmax scales, default block 128).

Policy: only the expert FFN matrices (``w1``, ``w2``, ``w3``) are quantized. The router ``gate``,
the norms and the embeddings (and ``lm_head``) stay in 16/32-bit; the model loader decides which
modules are quantized, this package never does.
"""

from .dispatch import Prepared, matmul, prepare, select_path
from .formats import FORMAT_VERSION, QuantizedTensor, QuantSpec, dequantize, quantize, spec_for_bits
from .linear import QuantLinear
from .reference import reference_matmul

__all__ = [
    "FORMAT_VERSION",
    "Prepared",
    "QuantLinear",
    "QuantSpec",
    "QuantizedTensor",
    "dequantize",
    "matmul",
    "prepare",
    "quantize",
    "reference_matmul",
    "select_path",
    "spec_for_bits",
]
