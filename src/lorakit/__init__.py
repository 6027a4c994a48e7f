"""lorakit: LoRA (Hu et al., ICLR 2022) for any PyTorch model, in PEFT's adapter format.

    import lorakit
    model = lorakit.inject(model, lorakit.LoraConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"]))
"""

from . import baselines
from .adapters import (
    active_adapters,
    adapter_parameters,
    adapter_state_dict,
    delete_adapter,
    disable_adapters,
    init_adapters,
    list_adapters,
    set_adapter,
    summary,
    trainable_parameters,
)
from .analysis import (
    amplification,
    analyze,
    effective_rank,
    numerical_rank,
    singular_spectrum,
    subspace_similarity,
    write_report,
)
from .checkpoint import load_adapter, read_adapter, save_adapter
from .config import LoraConfig
from .convert import convert_adapter, inspect_adapter
from .data import load_data
from .functional import delta_weight, lora_scale
from .injection import inject
from .layers import LoraLayer
from .merging import merge, merge_and_unload, unload, unmerge
from .models import load_model
from .multi import combine_adapters, mixed_batch
from .precision import cast_base, describe_precision, pick_base_dtype
from .training import TrainConfig, TrainingError, TrainResult, finetune

__version__ = "0.1.0"

__all__ = [
    "amplification",
    "analyze",
    "baselines",
    "effective_rank",
    "numerical_rank",
    "singular_spectrum",
    "subspace_similarity",
    "write_report",
    "TrainConfig",
    "TrainResult",
    "TrainingError",
    "finetune",
    "load_data",
    "load_model",
    "LoraConfig",
    "LoraLayer",
    "active_adapters",
    "adapter_parameters",
    "adapter_state_dict",
    "delete_adapter",
    "delta_weight",
    "disable_adapters",
    "init_adapters",
    "inject",
    "list_adapters",
    "load_adapter",
    "lora_scale",
    "merge",
    "merge_and_unload",
    "pick_base_dtype",
    "cast_base",
    "describe_precision",
    "mixed_batch",
    "combine_adapters",
    "read_adapter",
    "save_adapter",
    "set_adapter",
    "summary",
    "trainable_parameters",
    "unload",
    "unmerge",
    "convert_adapter",
    "inspect_adapter",
]
