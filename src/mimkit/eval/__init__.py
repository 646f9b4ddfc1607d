from mimkit.eval.features import extract_features
from mimkit.eval.knn import knn_accuracy, knn_classify

__all__ = ["extract_features", "knn_accuracy", "knn_classify"]
