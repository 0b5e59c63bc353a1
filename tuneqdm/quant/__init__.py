"""Packing, the weight quantizer and the quantized layers."""

from .layers import QUANTIZED_CLASSES, QConv2d, QLinear, QuantizedLayer, register_qmodule
from .packing import pack, unpack
from .quantizer import QuantizedWeight, quantize_weight, sqnr_db
from .weight_cache import cached_weights
