"""kerasq: quantization-aware training, pruning, clustering, distillation, weight transfer and
verified int8 TFLite export for Keras 3."""

import sys as _sys

if _sys.argv[:1] == ["-m"] and getattr(_sys, "orig_argv", [])[1:3] == ["-m", "kerasq"]:
    # `python -m kerasq ...` imports this package before its __main__ runs: silence TensorFlow's
    # start-up messages here, as the `kerasq` console script does (`--verbose` keeps them).
    import kerasq_command as _command

    if not _command.wants_logging(_sys.orig_argv[2:]):
        _command.silence_tensorflow()

from kerasq import clustering, data, distillation, experimental, export, graph, pruning, quantization, quantizers, transfer
from kerasq.clustering import (
    CentroidInitialization,
    ClusterableLayer,
    ClusterWeights,
    cluster_scope,
    cluster_weights,
    strip_clustering,
)
from kerasq.distillation import Distiller
from kerasq.export import (
    ExportError,
    ExportHook,
    ParityReport,
    TFLiteModel,
    export_tflite,
    register_export_hook,
    verify_tflite,
)
from kerasq.graph import LayerFacts, estimate_macs, register_layer_facts
from kerasq.pruning import (
    ConstantSparsity,
    PolynomialDecay,
    PrunableLayer,
    PruneLowMagnitude,
    PruningSchedule,
    PruningSummaries,
    UpdatePruningStep,
    prune_low_magnitude,
    prune_scope,
    strip_pruning,
)
from kerasq.pruning.channels import penalize_batchnorm_scales, prune_channels
from kerasq.quantization import (
    ActivationQuantizer,
    DelayQuantization,
    FreezeBatchNorm,
    FreezeRanges,
    QuantizationSummaries,
    QuantizationScheme,
    Quantize,
    QuantizeAnnotate,
    Default8BitClusterPreserveQuantizeScheme,
    Default8BitPrunePreserveQuantizeScheme,
    Default8BitQuantizeScheme,
    QuantizeConfig,
    QuantizeWrapper,
    WeightQuantizer,
    calibrate_ranges,
    is_quantized,
    quantize_annotate_layer,
    quantize_annotate_model,
    quantize_apply,
    quantize_model,
    quantize_scope,
    register_handler,
)
from kerasq.quantization.gradients import QuantizedGradients
from kerasq.transfer import TransferReport, deepen, migrate_legacy, transfer_weights, widen

__version__ = "0.1.0"
