"""Gate 3 (patch 0001): vLLM refuses the third-party `turboquant-vllm` general plugin.

The real package (PyPI turboquant-vllm 1.5.0) needs Python >= 3.12 and pulls vLLM, so an installed
distribution with the same name and the same entry-point line is built here: dist-info METADATA +
entry_points.txt, exactly what importlib.metadata reads. Its `register_tq4_backend` only records
that it ran. A second, unrelated plugin shows that other plugins still load. The loader under test
is vLLM's own `load_general_plugins`.
"""
from __future__ import annotations

import pytest

from conftest import run_in_vllm

TQ_ENTRY_POINT = "tq4_backend = turboquant_vllm.vllm:register_tq4_backend"
REFUSAL = ("Refusing to load vLLM plugin tq4_backend -> turboquant_vllm.vllm:register_tq4_backend "
           "from the third-party package turboquant-vllm")
REMOVAL_HINT = "Remove it with `pip uninstall turboquant-vllm`."

LOAD_PLUGINS = r'''
import json, os, sys
sys.path.insert(0, %(site)r)
import vllm.logger  # configures vLLM's log handlers, as `vllm serve` does
from vllm.plugins import load_general_plugins
load_general_plugins()
called = sorted(f for f in os.listdir(%(marks)r))
print(json.dumps({"called": called, "imported": "turboquant_vllm" in sys.modules}))
'''


def _write_dist(site, dist_name, version, module, source, entry_point):
    package = site / module
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "vllm.py").write_text(source)
    dist_info = site / f"{dist_name.replace('-', '_')}-{version}.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {dist_name}\nVersion: {version}\n")
    (dist_info / "entry_points.txt").write_text(f"[vllm.general_plugins]\n{entry_point}\n")
    (dist_info / "RECORD").write_text("")


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory):
    site = tmp_path_factory.mktemp("site")
    marks = tmp_path_factory.mktemp("marks")
    mark = "import os, pathlib\ndef {fn}():\n    pathlib.Path(os.environ['TQ_PLUGIN_MARKS'], '{fn}').touch()\n"
    _write_dist(site, "turboquant-vllm", "1.5.0", "turboquant_vllm",
                mark.format(fn="register_tq4_backend"), TQ_ENTRY_POINT)
    _write_dist(site, "tqstack-probe-plugin", "0.1.0", "tqstack_probe_plugin",
                mark.format(fn="register_probe"),
                "probe = tqstack_probe_plugin.vllm:register_probe")
    return site, marks


def _load(tree, plugin_site, allowlist=None):
    site, marks = plugin_site
    for mark in marks.iterdir():
        mark.unlink()
    env = {"TQ_PLUGIN_MARKS": str(marks), "VLLM_LOGGING_LEVEL": "INFO"}
    if allowlist is not None:
        env["VLLM_PLUGINS"] = allowlist
    run = run_in_vllm(tree, LOAD_PLUGINS % {"site": str(site), "marks": str(marks)}, env=env,
                      timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return run, run.json()


def test_pristine_loads_turboquant_vllm(pristine_tree, plugin_site):
    _, result = _load(pristine_tree, plugin_site)
    assert result == {"called": ["register_probe", "register_tq4_backend"], "imported": True}
    # The allowlist does not protect a user who names it.
    _, result = _load(pristine_tree, plugin_site, allowlist="tq4_backend,probe")
    assert "register_tq4_backend" in result["called"]


def test_patched_refuses_turboquant_vllm_and_loads_others(patched_tree, plugin_site):
    run, result = _load(patched_tree, plugin_site)
    assert result == {"called": ["register_probe"], "imported": False}
    log = run.stdout + run.stderr
    assert log.count(REFUSAL) == 1, log[-3000:]
    assert REMOVAL_HINT in log


def test_patched_refuses_it_even_when_allowlisted(patched_tree, plugin_site):
    run, result = _load(patched_tree, plugin_site, allowlist="tq4_backend,probe")
    assert result == {"called": ["register_probe"], "imported": False}
    assert (run.stdout + run.stderr).count(REFUSAL) == 1
