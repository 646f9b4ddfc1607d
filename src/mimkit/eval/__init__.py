from mimkit.eval.attentive import CrossAttentionPooler, EfficientProbe, attentive_probe, trainable_parameters
from mimkit.backends import LoadedEncoder, load_encoder
from mimkit.eval.baselines import PixelEncoder, baseline_encoders
from mimkit.eval.features import extract_features, extract_layer_features, extract_tokens
from mimkit.eval.fewshot import few_shot
from mimkit.eval.finetune import RECIPES, finetune, finetune_sweep
from mimkit.eval.knn import knn_accuracy, knn_classify
from mimkit.eval.labels import aggregate_tables, label_table
from mimkit.eval.layerwise import layerwise_probe
from mimkit.eval.linear import MultiLinearProbe, linear_probe, linear_probe_on, train_linear_sweep
from mimkit.eval.protocols import PROTOCOLS, run_protocol, summary_line
from mimkit.eval.splits import carve_balanced_val, label_subsets

__all__ = [
    "PROTOCOLS",
    "RECIPES",
    "CrossAttentionPooler",
    "EfficientProbe",
    "LoadedEncoder",
    "MultiLinearProbe",
    "PixelEncoder",
    "aggregate_tables",
    "attentive_probe",
    "baseline_encoders",
    "carve_balanced_val",
    "extract_features",
    "extract_layer_features",
    "extract_tokens",
    "few_shot",
    "finetune",
    "finetune_sweep",
    "knn_accuracy",
    "knn_classify",
    "label_subsets",
    "label_table",
    "layerwise_probe",
    "linear_probe",
    "linear_probe_on",
    "load_encoder",
    "run_protocol",
    "summary_line",
    "train_linear_sweep",
    "trainable_parameters",
]
