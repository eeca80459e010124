"""Server facts (raw/server/<dtype>.json, copied into manifest.json's "servers") name the TurboQuant
boundary protection the engine ran with: patch 0011's cache_config field, read from /metrics. The
capacity part's planner prediction uses the stack's own boundary setting."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tqbench.runner import _save_server_facts

PATCHED = ('vllm:cache_config_info{cache_dtype="turboquant_4bit_nc",'
           'kv_cache_dtype_skip_layers="[\'5\', \'59\', \'sliding_window\']",turboquant_boundary_layers="1"} 1.0\n')
UNPATCHED = 'vllm:cache_config_info{cache_dtype="auto",kv_cache_dtype_skip_layers="[]"} 1.0\n'


@pytest.fixture
def metrics_server():
    state = {"metrics": ""}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            body = (state["metrics"] if self.path == "/metrics" else json.dumps({"version": "0.26.0"})).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.mark.parametrize("metrics,boundary,skips", [
    (PATCHED, 1, "['5', '59', 'sliding_window']"),
    (UNPATCHED, None, "[]"),
])
def test_server_facts_record_boundary_layers(metrics_server, tmp_path, metrics, boundary, skips):
    state, base_url = metrics_server
    state["metrics"] = metrics
    _save_server_facts(tmp_path, "turboquant_4bit_nc", base_url, None)
    facts = json.loads((tmp_path / "raw" / "server" / "turboquant_4bit_nc.json").read_text())
    assert facts["turboquant_boundary_layers"] == boundary
    assert facts["kv_cache_dtype_skip_layers"] == skips
    assert facts["vllm_version"] == "0.26.0"


def test_planner_prediction_uses_the_stack_boundary_setting():
    from tqconfig import load_stack

    from tqbench.capacity import planner_prediction

    stack = load_stack("rtx5060ti-x4-gemma4-31b")
    prediction = planner_prediction(stack, "turboquant_4bit_nc", 32768)
    assert prediction["plan"]["turboquant_boundary_layers"] == stack.serving.turboquant_boundary_layers == 1
    assert prediction["predicted_kv_tokens"] == stack.plan(max_model_len=32768).kv_cache_tokens
