"""--turboquant-boundary-layers probe, run *inside* a vLLM subprocess (PYTHONPATH = a vLLM tree).

Per case it parses a `vllm serve ...` argv with vLLM's own parser (a `FlexibleArgumentParser` with the
real `serve` subcommand, `ServeSubcommand.subparser_init`), builds `EngineArgs.from_cli_args`
and runs the real `create_engine_config`, then prints one JSON line: a list with one result per case
(the parsed option, cache_config's value, the final kv_cache_dtype_skip_layers, the engine's startup
config line `str(vllm_config)`, the INFO/WARNING lines vLLM logged, or the error).

What is not real, as in vllm_kv_probe.py: the platform is vLLM's `CudaPlatform` with stubbed device
queries (vllm_kv_probe._install_cuda_platform), and vLLM's model-class inspection, which it normally
runs in a child process (that child would import the CUDA platform without the stubs), runs in this
process instead. No model is built; --load-format dummy.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import sys
import tempfile
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(f"{record.levelname} {record.getMessage()}")


def _vllm_parser():
    """`vllm`'s top-level parser with the real `serve` subcommand (ServeSubcommand.subparser_init)."""
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="vllm")
    ServeSubcommand().subparser_init(parser.add_subparsers(dest="subparser"))
    return parser


def help_text(query: str) -> dict:
    parser = _vllm_parser()
    out = io.StringIO()
    code = None
    with contextlib.redirect_stdout(out):
        try:
            parser.parse_args(["serve", f"--help={query}"])
        except SystemExit as exc:
            code = exc.code
    return {"exit": code, "text": out.getvalue()}


def run_case(case: dict, records: _Records) -> dict:
    import vllm_kv_probe
    from vllm.engine.arg_utils import EngineArgs

    result: dict = {"label": case["label"]}
    saved = vllm_kv_probe.set_case_env(case.get("env", {}))
    model_dir = tempfile.mkdtemp(prefix="tq-boundary-")
    shutil.copy(os.path.join(case["config_dir"], "config.json"), model_dir)
    records.lines.clear()
    stage = "parse_args"
    try:
        argv = ["serve", model_dir, "--load-format", "dummy", "--skip-tokenizer-init", "--enforce-eager",
                "--max-model-len", "4096", "--kv-cache-dtype", case["kv_cache_dtype"],
                "--hf-overrides", json.dumps({"architectures": [case["architecture"]]}),
                *case.get("argv", [])]
        parser = _vllm_parser()
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            try:
                args = parser.parse_args(argv)
            except SystemExit as exc:
                result.update(ok=False, stage=stage, error_type="SystemExit", exit=exc.code,
                              error=err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else "")
                return result
        args.model = args.model_tag  # as ServeSubcommand.cmd does
        result["parsed"] = args.turboquant_boundary_layers
        stage = "create_engine_config"
        engine_args = EngineArgs.from_cli_args(args)
        vllm_config = engine_args.create_engine_config()
        cache = vllm_config.cache_config
        result.update(
            ok=True,
            engine_arg=engine_args.turboquant_boundary_layers,
            cache_config=cache.turboquant_boundary_layers,
            skip_layers=list(cache.kv_cache_dtype_skip_layers),
            config_line=str(vllm_config),
        )
    except Exception as exc:
        result.update(ok=False, stage=stage, error_type=type(exc).__name__, error=str(exc),
                      traceback=traceback.format_exc()[-3000:])
    finally:
        result["log"] = list(records.lines)
        shutil.rmtree(model_dir, ignore_errors=True)
        vllm_kv_probe.restore_env(saved)
    return result


def main(cases: list[dict], help_queries: list[str]) -> None:
    # vllm/engine/arg_utils.py reads attribute docstrings into the help text only when the command
    # line asks for help (NEEDS_HELP, decided at import): look like `vllm serve --help`.
    sys.argv = ["vllm", "serve", "--help"]
    import vllm_kv_probe

    vllm_kv_probe._install_cuda_platform((12, 0), 141 * 2**30, "NVIDIA H200")
    import vllm.model_executor.models.registry as registry

    registry._run_in_subprocess = lambda fn: fn()  # see the module docstring
    records = _Records()
    logging.getLogger("vllm").addHandler(records)
    logging.getLogger("vllm").setLevel(logging.INFO)
    out = {"help": {q: help_text(q) for q in help_queries},
           "cases": [run_case(case, records) for case in cases]}
    print(json.dumps(out))
