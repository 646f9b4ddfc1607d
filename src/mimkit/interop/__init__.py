"""Weights in and out: export to timm / transformers / facebookresearch/mae, import from them, inspect.

No function here unpickles arbitrary objects: weights are read from safetensors or with
`torch.load(weights_only=True)`, and written as safetensors plus JSON.
"""

from mimkit.interop.export import FORMATS, ExportError, export_checkpoint
from mimkit.interop.importers import import_hf, import_mae_checkpoint, import_timm
from mimkit.interop.info import checkpoint_info, format_info
from mimkit.interop.io import read_state_file, save_method_checkpoint, torch_load_safe

__all__ = [
    "FORMATS",
    "ExportError",
    "checkpoint_info",
    "export_checkpoint",
    "format_info",
    "import_hf",
    "import_mae_checkpoint",
    "import_timm",
    "read_state_file",
    "save_method_checkpoint",
    "torch_load_safe",
]
