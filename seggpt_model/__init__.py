"""SegGPT: in-context segmentation, importable without Label Studio."""
from .modeling import SegGPT, SegGPTConfig
from .predictor import Prediction, SegGPTPredictor
from .weights import WeightsError, load_seggpt, save_checkpoint

__all__ = ["Prediction", "SegGPT", "SegGPTConfig", "SegGPTPredictor", "WeightsError", "load_seggpt",
           "save_checkpoint"]
