"""Quantization-aware training: quantizers, schemes, the wrapper layer and the model rewrite."""

from kerasq.quantization.handlers import (
    FIXED,
    PASS_THROUGH,
    QUANTIZE,
    SAME_SCALE,
    KernelHandler,
    LayerHandler,
    get_handler,
    register_handler,
)
from kerasq.quantization.calibrate import calibrate_ranges
from kerasq.quantization.callbacks import DelayQuantization, FreezeBatchNorm, FreezeRanges, QuantizationSummaries
from kerasq.quantization.layers import Quantize, QuantizeWrapper
from kerasq.quantization.quantize import (
    QuantizeAnnotate,
    is_quantized,
    quantize_annotate_layer,
    quantize_annotate_model,
    quantize_apply,
    quantize_model,
    quantize_scope,
)
from kerasq.quantization.quantizers import ActivationQuantizer, WeightQuantizer
from kerasq.quantization.tfmot_compat import QuantizeConfig
from kerasq.quantization.combine import (
    Default8BitClusterPreserveQuantizeScheme,
    Default8BitPrunePreserveQuantizeScheme,
    Default8BitQuantizeScheme,
)
from kerasq.quantization.scheme import QuantizationScheme, get_scheme
from kerasq.quantization import export_hook  # noqa: F401  (registers quantized models with export)
from kerasq.quantization import attention, einsum, normalization  # noqa: F401  (register their handlers)
