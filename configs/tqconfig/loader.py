"""Load and cross-check the YAML profiles; build `Stack` objects (the API the harness uses)."""
from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from .architecture import Architecture, load_architecture
from .errors import KvCacheDtypeRefused, ProfileError, UnknownProfile
from .planner import CapacityPlan, plan_capacity
from .schema import KV_CACHE_DTYPES, Hardware, ModelProfile, StackProfile

DEFAULT_CONFIG_ROOT = Path(__file__).resolve().parents[1]


def config_root() -> Path:
    """configs/ of this checkout, or $TQCONFIG_ROOT (a directory with hardware/, models/, stacks/, hf/)."""
    return Path(os.environ.get("TQCONFIG_ROOT") or DEFAULT_CONFIG_ROOT)


def repo_root() -> Path:
    return config_root().parent
CONTAINER_PORT = 8000

# Only vLLM's own general plugins may load: a stray `turboquant-vllm` plugin rewrites every KV spec
# (gate 3); the image also refuses to install it.
BASE_ENVIRONMENT = {
    "VLLM_PLUGINS": "lora_filesystem_resolver,lora_hf_hub_resolver",
    "VLLM_USE_FLASHINFER_SAMPLER": "0",
}

P = TypeVar("P", bound=BaseModel)


def _relative(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(repo_root().resolve()))
    except ValueError:
        return str(path)


def _describe(error: dict[str, Any], model: type[BaseModel]) -> tuple[str, str]:
    field = ".".join(str(part) for part in error["loc"]) or "(top level)"
    kind = error["type"]
    if kind == "extra_forbidden":
        parent: Any = model
        for part in error["loc"][:-1]:
            annotation = getattr(parent, "model_fields", {}).get(part)
            parent = getattr(annotation, "annotation", None) if annotation else None
        valid = sorted(getattr(parent, "model_fields", {}) or [])
        hint = f"; valid fields here: {', '.join(valid)}" if valid else ""
        return field, f"unknown field{hint}"
    if kind == "missing":
        return field, "required field is missing"
    return field, f"{error['msg']} (got {error.get('input')!r})"


def load_profile(path: Path, model: type[P]) -> P:
    """Parse one YAML profile; any problem becomes a single ProfileError naming file and field."""
    shown = _relative(path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ProfileError(shown, "(yaml)", f"not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ProfileError(shown, "(top level)", "must be a mapping of field: value")
    try:
        profile = model.model_validate(data)
    except ValidationError as exc:
        # a misspelt key also shows up as "missing": report the misspelling, the root cause, first
        errors = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")
        field, problem = _describe(errors[0], model)
        more = f" (+{len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
        raise ProfileError(shown, field, problem + more) from None
    if getattr(profile, "name", path.stem) != path.stem:
        raise ProfileError(shown, "name", f"{profile.name!r} must match the file name {path.stem!r}")
    return profile


def _names(kind: str) -> list[str]:
    return sorted(p.stem for p in (config_root() / kind).glob("*.yaml"))


def _path(kind: str, label: str, name: str) -> Path:
    path = config_root() / kind / f"{name}.yaml"
    if not path.is_file():
        raise UnknownProfile(label, name, _names(kind))
    return path


def list_stacks() -> list[str]:
    return _names("stacks")


def list_models() -> list[str]:
    return _names("models")


def list_hardware() -> list[str]:
    return _names("hardware")


def load_hardware(name: str) -> Hardware:
    return load_profile(_path("hardware", "hardware profile", name), Hardware)


def load_model(name: str) -> ModelProfile:
    path = _path("models", "model", name)
    profile = load_profile(path, ModelProfile)
    config = config_root() / "hf" / profile.hf_config / "config.json"
    if not config.is_file():
        available = sorted(p.parent.name for p in (config_root() / "hf").glob("*/config.json"))
        raise ProfileError(_relative(path), "hf_config",
                           f"{profile.hf_config!r} has no configs/hf/{profile.hf_config}/config.json; "
                           f"valid: {', '.join(available)}")
    return profile


@lru_cache(maxsize=None)
def _architecture_cached(config_path: str) -> Architecture:
    return load_architecture(Path(config_path))


def architecture_for(model: ModelProfile) -> Architecture:
    return _architecture_cached(str(config_root() / "hf" / model.hf_config / "config.json"))


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


class Stack:
    """A servable stack: hardware x model x serving settings, validated together."""

    def __init__(self, profile: StackProfile, model: ModelProfile, hardware: Hardware, source: Path):
        self.profile = profile
        self.model = model
        self.hardware = hardware
        self.source = source

    def __repr__(self) -> str:
        return f"Stack({self.name!r})"

    @property
    def name(self) -> str:
        return self.profile.name

    @property
    def served_model_name(self) -> str:
        """The name clients send as "model" (--served-model-name)."""
        return self.model.served_model_name

    @property
    def compose_file(self) -> Path:
        return repo_root() / "compose" / f"{self.name}.yaml"

    @property
    def serving(self):
        return self.profile.serving

    @property
    def gpu_memory_utilization(self) -> float:
        return self.serving.gpu_memory_utilization or self.hardware.defaults.gpu_memory_utilization

    @property
    def architecture(self) -> Architecture:
        return architecture_for(self.model)

    @property
    def source_files(self) -> list[str]:
        return [
            _relative(self.source),
            f"configs/models/{self.model.name}.yaml",
            f"configs/hardware/{self.hardware.name}.yaml",
            f"configs/hf/{self.model.hf_config}/config.json",
        ]

    def check_kv_cache_dtype(self, kv_cache_dtype: str) -> str:
        if kv_cache_dtype not in KV_CACHE_DTYPES:
            raise KvCacheDtypeRefused(self.hardware.name, kv_cache_dtype, "not a KV-cache dtype tqstack knows",
                                      self.hardware.supported_kv_cache_dtypes)
        if kv_cache_dtype in self.hardware.refused_kv_cache_dtypes:
            raise KvCacheDtypeRefused(self.hardware.name, kv_cache_dtype,
                                      self.hardware.refused_kv_cache_dtypes[kv_cache_dtype],
                                      self.hardware.supported_kv_cache_dtypes)
        if kv_cache_dtype not in self.hardware.supported_kv_cache_dtypes:
            raise KvCacheDtypeRefused(self.hardware.name, kv_cache_dtype, "not validated on this hardware",
                                      self.hardware.supported_kv_cache_dtypes)
        return kv_cache_dtype

    def _options(self, kv_cache_dtype: str, max_model_len: int) -> dict[str, Any]:
        s, m = self.serving, self.model
        options: dict[str, Any] = {}
        if m.revision:
            options["revision"] = m.revision
        options["served_model_name"] = m.served_model_name
        if m.tokenizer != m.hf_id:
            options["tokenizer"] = m.tokenizer
        options["kv_cache_dtype"] = kv_cache_dtype
        if s.turboquant_boundary_layers is not None:
            options["turboquant_boundary_layers"] = s.turboquant_boundary_layers
        options["max_model_len"] = max_model_len
        options["tensor_parallel_size"] = s.tensor_parallel_size
        options["gpu_memory_utilization"] = self.gpu_memory_utilization
        options["max_num_seqs"] = s.max_num_seqs
        options["max_num_batched_tokens"] = s.max_num_batched_tokens
        if s.enable_prefix_caching is not None:
            options["enable_prefix_caching"] = s.enable_prefix_caching
        if s.language_model_only:
            options["language_model_only"] = True
        if m.chat.reasoning_parser:
            options["reasoning_parser"] = m.chat.reasoning_parser
        if m.chat.default_chat_template_kwargs:
            options["default_chat_template_kwargs"] = json.dumps(m.chat.default_chat_template_kwargs,
                                                                 separators=(",", ":"))
        return options

    def serve_args(self, kv_cache_dtype: str | None = None, max_model_len: int | None = None,
                   **overrides: Any) -> list[str]:
        """argv after `vllm serve`: the model first, then options. `overrides` use Python names
        (port=8000, host="0.0.0.0", model="other/id"); True gives a bare flag, False `--no-<flag>`, None drops it."""
        dtype = self.check_kv_cache_dtype(kv_cache_dtype or self.serving.kv_cache_dtype)
        length = max_model_len or self.serving.max_model_len
        model_id = overrides.pop("model", None) or self.model.hf_id
        options = self._options(dtype, int(length))
        options.update(overrides)
        argv = [str(model_id)]
        for name, value in options.items():
            if value is None:
                continue
            if value is True:
                argv.append(_option(name))
            elif value is False:
                argv.append("--no-" + name.replace("_", "-"))
            else:
                argv += [_option(name), str(value)]
        argv += [*self.hardware.serve_args, *self.model.serve_args, *self.serving.extra_args]
        return argv

    def environment(self) -> dict[str, str]:
        return {**BASE_ENVIRONMENT, **self.hardware.environment, **self.profile.environment}

    def plan(self, kv_cache_dtype: str | None = None, max_model_len: int | None = None,
             **overrides: Any) -> CapacityPlan:
        """Capacity plan of this stack (optionally at another KV dtype / context length)."""
        dtype = self.check_kv_cache_dtype(kv_cache_dtype or self.serving.kv_cache_dtype)
        s = self.serving
        settings: dict[str, Any] = dict(
            kv_cache_dtype=dtype,
            max_model_len=max_model_len or s.max_model_len,
            gpu_memory_utilization=self.gpu_memory_utilization,
            tensor_parallel_size=s.tensor_parallel_size,
            max_num_seqs=s.max_num_seqs,
            max_num_batched_tokens=s.max_num_batched_tokens,
            enable_prefix_caching=bool(s.enable_prefix_caching) and self.architecture.is_hybrid,
            language_model_only=s.language_model_only,
            turboquant_boundary_layers=s.turboquant_boundary_layers,
        )
        settings.update(overrides)
        return plan_capacity(self.model, self.hardware, architecture=self.architecture, **settings)


def load_stack(name: str) -> Stack:
    path = _path("stacks", "stack", name)
    profile = load_profile(path, StackProfile)
    shown = _relative(path)
    try:
        hardware = load_hardware(profile.hardware)
    except UnknownProfile as exc:
        raise ProfileError(shown, "hardware", f"{profile.hardware!r} is unknown; valid: {', '.join(exc.valid)}") from None
    try:
        model = load_model(profile.model)
    except UnknownProfile as exc:
        raise ProfileError(shown, "model", f"{profile.model!r} is unknown; valid: {', '.join(exc.valid)}") from None
    stack = Stack(profile, model, hardware, path)
    try:
        stack.check_kv_cache_dtype(profile.serving.kv_cache_dtype)
    except KvCacheDtypeRefused as exc:
        raise ProfileError(shown, "serving.kv_cache_dtype", str(exc)) from None
    if profile.serving.tensor_parallel_size > hardware.gpu_count:
        raise ProfileError(shown, "serving.tensor_parallel_size",
                           f"{profile.serving.tensor_parallel_size} exceeds the {hardware.gpu_count} GPU(s) of "
                           f"{hardware.name}; valid: 1..{hardware.gpu_count}")
    return stack
