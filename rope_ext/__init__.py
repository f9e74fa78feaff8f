"""rope_ext: the RoPE scaling math of ropeserve, as pure functions.

Methods (PI, NTK-aware, Dynamic NTK, NTK-by-parts, YaRN, Dynamic YaRN) in a registry, frozen validated
configs, cos/sin bucket tables in vLLM's layout, and the per-request scale policy. Imports torch and the
standard library only, never vLLM or FastAPI::

    from rope_ext import RotaryConfig, RopeScaling, choose_factor, compute_frequencies
    scaling = RopeScaling(method="dynamic_yarn", original_max_position=8192, max_factor=8)
    s = choose_factor(prompt_tokens=12000, max_tokens=256, scaling=scaling)        # -> 2.0
    inv_freq, temperature = compute_frequencies("yarn", RotaryConfig(64, 1e5), scaling, s)
"""

from rope_ext.config import RopeScaling, RotaryConfig, default_buckets, format_factor
from rope_ext.errors import CapacityExceededError, RopeConfigError
from rope_ext.methods import (
    METHODS,
    RopeFrequencies,
    bucket_method,
    compute_frequencies,
    find_correction_range,
    get_mscale,
    yarn_attention_factor,
)
from rope_ext.policy import choose_factor, pinned_max_tokens, planned_length, validate_override
from rope_ext.tables import BucketTables, bucket_frequencies, build_bucket_tables, cos_sin_rows, table_nbytes

__all__ = [
    "METHODS",
    "BucketTables",
    "CapacityExceededError",
    "RopeConfigError",
    "RopeFrequencies",
    "RopeScaling",
    "RotaryConfig",
    "bucket_frequencies",
    "bucket_method",
    "build_bucket_tables",
    "choose_factor",
    "compute_frequencies",
    "cos_sin_rows",
    "default_buckets",
    "format_factor",
    "find_correction_range",
    "get_mscale",
    "pinned_max_tokens",
    "planned_length",
    "table_nbytes",
    "validate_override",
    "yarn_attention_factor",
]
