"""tqconfig — tqstack's single source of truth: hardware, model and stack profiles (configs/*.yaml),
the KV-cache capacity planner and the docker compose renderer.

    import tqconfig
    stack = tqconfig.load_stack("rtx3090-x1-qwen3.6-27b")
    stack.serve_args()            # argv after `vllm serve`
    stack.environment()           # container environment
    stack.plan().kv_cache_tokens  # predicted KV capacity
"""
from .errors import KvCacheDtypeRefused, PlanInputError, ProfileError, TqConfigError, UnknownProfile
from .loader import (
    Stack,
    list_hardware,
    list_models,
    list_stacks,
    load_hardware,
    load_model,
    load_stack,
)
from .planner import CapacityPlan, LayerPlan, plan_capacity, tq_slot_bytes
from .schema import KV_CACHE_DTYPES, TURBOQUANT_DTYPES, Hardware, ModelProfile

__all__ = [
    "CapacityPlan", "Hardware", "KV_CACHE_DTYPES", "KvCacheDtypeRefused", "LayerPlan", "ModelProfile",
    "PlanInputError", "ProfileError", "Stack", "TURBOQUANT_DTYPES", "TqConfigError", "UnknownProfile",
    "list_hardware", "list_models", "list_stacks", "load_hardware", "load_model", "load_stack",
    "plan_capacity", "tq_slot_bytes",
]
