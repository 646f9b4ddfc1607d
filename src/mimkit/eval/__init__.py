from mimkit.eval.attentive import CrossAttentionPooler, EfficientProbe, attentive_probe, trainable_parameters
from mimkit.backends import LoadedEncoder, load_encoder
from mimkit.eval.features import extract_features, extract_layer_features, extract_tokens
from mimkit.eval.fewshot import few_shot
from mimkit.eval.finetune import finetune
from mimkit.eval.knn import knn_accuracy, knn_classify
from mimkit.eval.layerwise import layerwise_probe
from mimkit.eval.linear import MultiLinearProbe, linear_probe, train_linear_sweep
from mimkit.eval.protocols import PROTOCOLS, run_protocol, summary_line

__all__ = [
    "PROTOCOLS",
    "CrossAttentionPooler",
    "EfficientProbe",
    "LoadedEncoder",
    "MultiLinearProbe",
    "attentive_probe",
    "extract_features",
    "extract_layer_features",
    "extract_tokens",
    "few_shot",
    "finetune",
    "knn_accuracy",
    "knn_classify",
    "layerwise_probe",
    "linear_probe",
    "load_encoder",
    "run_protocol",
    "summary_line",
    "train_linear_sweep",
    "trainable_parameters",
]
