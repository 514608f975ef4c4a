"""Weight-only int8 / int4 quantization: Linear swaps, per-component presets, save format.

Quantization is a *module swap*: `quantize_model` replaces chosen `nn.Linear`s by `Int8Linear`
(per-output-channel symmetric int8) or `Int4Linear` (group-wise int4, asymmetric by default); the
model code never knows. Activations stay float; biases stay float.

Components (`--quant llm=int4,projector=int8,vision=none` or a preset name, see `PRESETS`):
* `llm`       — every Linear under `language_model.layers.*`, plus `lm_head`. A tied `lm_head`
                becomes its own quantized copy; the embedding stays float and the config is marked
                untied (`tie_word_embeddings=false`), which is what the model now is.
* `projector` — `mm_projector.0` and `mm_projector.2`.
* `vision`    — the attention `qkv` / `proj` Linears of the FastViTHD tower. Convolutions stay
                float: weight-only Linear kernels do not apply to them.

Kernels, in order of preference on CPU:
* `fastvlm.kernels` (our C kernels, compiled on first use; `kernels.available()`): the quantized
  layer's portable form is the kernel's layout, so an Int4Linear keeps only its nibble form. By
  default (`act_quant`) the kernel quantizes x per call and uses integer dot products;
  `act_quant = False` keeps exact fp32 math. Used for every M.
* Otherwise torch's CPU ops (looked up with `hasattr`, older torch falls back):
  `aten._weight_int8pack_mm` (plain int8 matrix, no shape constraints) and
  `aten._weight_int4pack_mm_for_cpu` over `_convert_weight_to_int4pack_for_cpu`'s ISA-specific
  layout (never written to disk; needs N % 16 == 0, K % group_size == 0, tinygemm convention
  w = (q - 8) * scale + zero). Their fp32 instantiations are slow, so they compute in
  `cpu_compute_dtype` (bf16, fp32 accumulation inside) and cast the output back.
* Elsewhere (CUDA, MPS, float64 inputs) dequantize-then-`F.linear`: correct, saves memory, no
  speed-up. Layers whose shapes int4 cannot take stay plain float `nn.Linear`s (listed in the
  summary); int8 takes every shape.

Files ("fastvlm" format only): config.json gets `"quantization": {"version": 1, "llm": "int4-g128",
"projector": "int8", "vision": "none"}`; a quantized Linear `X` stores `X.qweight` (int8 (N,K), or
for int4 uint8 (N,K/2) holding two 4-bit values per byte, low nibble = even column, unsigned
0..15), `X.scales` ((N,) or (N,K/G)), `X.zeros` (int4 only, (N,K/G)) and `X.bias`. This layout is
device-independent; `finalize()` repacks it for the kernel at load time. `weights.load_model`
calls `prepare_for_load` (empty quantized modules on the meta device, so the strict key check
holds) and `finalize` after assignment.

Layout: `scheme.py` (specs), `layer.py` (shared kernel dispatch), `int8.py`, `int4.py`,
`apply.py` (model-level swaps), `cli.py` (`fastvlm quantize`, which loads and saves checkpoints).
"""

from .apply import (
    QUANT_TYPES,
    ComponentStats,
    QuantSummary,
    component_linears,
    finalize,
    prepare_for_load,
    quantize_model,
)
from .int4 import (
    HAS_INT4_KERNEL,
    Int4Linear,
    dequantize_int4,
    int4_shape_ok,
    pack_nibbles,
    quantize_int4,
    unpack_nibbles,
)
from .int8 import HAS_INT8_KERNEL, Int8Linear, dequantize_int8, quantize_int8
from .scheme import (
    COMPONENTS,
    DEFAULT_GROUP_SIZE,
    FORMAT_VERSION,
    GROUP_SIZES,
    PRESETS,
    Scheme,
    parse_spec,
    spec_to_config,
)

__all__ = [
    "COMPONENTS", "DEFAULT_GROUP_SIZE", "FORMAT_VERSION", "GROUP_SIZES", "HAS_INT4_KERNEL",
    "HAS_INT8_KERNEL", "PRESETS", "QUANT_TYPES", "ComponentStats", "Int4Linear", "Int8Linear",
    "QuantSummary", "Scheme", "component_linears", "dequantize_int4", "dequantize_int8",
    "finalize", "int4_shape_ok", "pack_nibbles", "parse_spec", "prepare_for_load",
    "quantize_int4", "quantize_int8", "quantize_model", "spec_to_config", "unpack_nibbles",
]  # fmt: skip
