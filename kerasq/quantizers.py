"""tfmot's quantizer names (`tfmot.quantization.keras.quantizers`), for `kerasq.QuantizeConfig`s."""

from kerasq.quantization.tfmot_compat import AllValuesQuantizer, LastValueQuantizer, MovingAverageQuantizer, Quantizer

__all__ = ["Quantizer", "LastValueQuantizer", "MovingAverageQuantizer", "AllValuesQuantizer"]
