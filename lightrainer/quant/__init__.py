"""Int8 quantization for TensorRT: one small interface over pytorch-quantization and ModelOpt.

    net = quantize_model(net, backend="auto", keep_float=("head",))
    calibrate(net, train_loader, method="entropy", num_batches=20)
    export_onnx(net, x, "best_int8.onnx", verify=val_batches)  # Q/DQ ONNX (lightrainer.export)
"""

# The built-in backends register when their modules are imported, and ``auto`` tries them in this
# order: ModelOpt first (NVIDIA's maintained successor, which installs with current torch), then
# pytorch-quantization 2.1.3 (the original's library, no longer developed; kept for its users).
import lightrainer.quant.modelopt  # noqa: F401  (registers the backend)
import lightrainer.quant.pytorch_quantization  # noqa: F401  (registers the backend)
from lightrainer.quant.base import (
    INSTALL_HINT,
    QuantBackend,
    backend_of,
    get_backend,
    iter_quantizers,
    list_backends,
    register_backend,
)
from lightrainer.quant.calibrate import (
    CalibMethod,
    CalibrationResult,
    calibrate,
    get_calib_method,
    list_calib_methods,
    mse_amax,
    refresh_weight_amax,
    register_calib_method,
)
from lightrainer.quant.qdq import qdq_export_context, qdq_translation_table
from lightrainer.quant.replace import (
    add_quantizers,
    class_swap_factory,
    is_quantized_state_dict,
    load_quantized_state_dict,
    quant_layer_types,
    quantizable_layers,
    quantize_like,
    quantize_model,
    register_quant_layer,
)
from lightrainer.quant.sensitivity import LayerSensitivity, quant_sensitivity, write_sensitivity
from lightrainer.quant.workflow import Int8Exporter, PTQResult, check_quant_config, evaluate, post_training_quantize

__all__ = [
    "Int8Exporter",
    "LayerSensitivity",
    "PTQResult",
    "check_quant_config",
    "evaluate",
    "is_quantized_state_dict",
    "load_quantized_state_dict",
    "post_training_quantize",
    "qdq_export_context",
    "qdq_translation_table",
    "quant_sensitivity",
    "write_sensitivity",
    "INSTALL_HINT",
    "CalibMethod",
    "CalibrationResult",
    "QuantBackend",
    "add_quantizers",
    "backend_of",
    "calibrate",
    "class_swap_factory",
    "get_backend",
    "get_calib_method",
    "iter_quantizers",
    "list_backends",
    "list_calib_methods",
    "mse_amax",
    "refresh_weight_amax",
    "quant_layer_types",
    "quantizable_layers",
    "quantize_like",
    "quantize_model",
    "register_backend",
    "register_calib_method",
    "register_quant_layer",
]
