"""patches/apply on the real pinned vLLM tree with the real series, plus synthetic diff edge cases.

The real-series tests need every patch listed in patches/vllm-0.26.0/series to exist and carry
correct Target-SHA256 lines; they fail (by design) until then.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, run_in_vllm

APPLY = REPO / "patches" / "apply"
# make patches-check SERIES_DIR=... passes a work-in-progress series through TQ_VLLM_SERIES.
SERIES = Path(os.environ.get("TQ_VLLM_SERIES", REPO / "patches" / "vllm-0.26.0"))
MARKER = "vllm/_tqstack_patches.json"


def apply_tool(*args, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run patches/apply with a plain python, as an image build would."""
    return subprocess.run([sys.executable, str(APPLY), *map(str, args)], capture_output=True,
                          text=True, timeout=120, env={**os.environ, **(env or {})})


def output(result: subprocess.CompletedProcess) -> str:
    return result.stdout + result.stderr


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def series_patch_names(series_dir: Path) -> list[str]:
    lines = (series_dir / "series").read_text().splitlines()
    return [entry for entry in (line.split("#", 1)[0].strip() for line in lines) if entry]


def touched_paths(series_dir: Path) -> set[str]:
    """Every file a series' diffs name (a/ and b/ sides, one component stripped)."""
    paths = set()
    for name in series_patch_names(series_dir):
        if not (series_dir / name).is_file():
            continue  # patches/apply reports the missing patch itself, with a clear message
        text = (series_dir / name).read_text()
        paths |= set(re.findall(r"^(?:---|\+\+\+) [ab]/(\S+)", text, flags=re.MULTILINE))
    return paths


def copy_tree_subset(source: Path, dest: Path, relative_paths) -> Path:
    """dist-info plus the listed files: enough for the tool, and fast to copy."""
    for dist_info in source.glob("vllm-*.dist-info"):
        shutil.copytree(dist_info, dest / dist_info.name)
    (dest / "vllm").mkdir(parents=True, exist_ok=True)
    for rel in relative_paths:
        if (source / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / rel, dest / rel)
    return dest


# ----------------------------------------------------------------------------- real series

@pytest.fixture
def real_target(tmp_path, pristine_tree) -> Path:
    return copy_tree_subset(pristine_tree, tmp_path / "site-packages", touched_paths(SERIES))


def test_real_series_applies_verifies_is_idempotent_and_reverses(real_target, pristine_tree):
    names = series_patch_names(SERIES)
    pristine_hashes = {rel: sha256_of(real_target / rel)
                       for rel in touched_paths(SERIES) if (real_target / rel).exists()}

    first = apply_tool("--series", SERIES, real_target)
    assert first.returncode == 0, output(first)
    for name in names:
        assert re.search(rf"applied\s+{re.escape(name)}", first.stdout), first.stdout
    marker = json.loads((real_target / MARKER).read_text())
    assert marker["series"] == "vllm-0.26.0"
    assert marker["patches"] == names
    assert marker["vllm_version"] == "0.26.0"
    assert re.fullmatch(r"[0-9a-f]{64}", marker["series_sha256"])

    verify = apply_tool("--series", SERIES, "--verify", real_target)
    assert verify.returncode == 0, output(verify)
    assert verify.stdout.strip().count("\n") == 0 and "verified" in verify.stdout

    second = apply_tool("--series", SERIES, real_target)
    assert second.returncode == 0, output(second)
    assert len(re.findall(r"^\s+already applied", second.stdout, flags=re.MULTILINE)) == len(names), second.stdout

    reverse = apply_tool("--series", SERIES, "--reverse", real_target)
    assert reverse.returncode == 0, output(reverse)
    assert not (real_target / MARKER).exists()
    after_reverse = {rel: sha256_of(real_target / rel)
                     for rel in touched_paths(SERIES) if (real_target / rel).exists()}
    assert after_reverse == pristine_hashes

    not_applied = apply_tool("--series", SERIES, "--verify", real_target)
    assert not_applied.returncode == 1, output(not_applied)
    check = apply_tool("--series", SERIES, "--check", real_target)
    assert check.returncode == 0, output(check)


def test_check_on_pristine_tree_passes_and_writes_nothing(pristine_tree):
    before = {rel: sha256_of(pristine_tree / rel)
              for rel in touched_paths(SERIES) if (pristine_tree / rel).exists()}
    result = apply_tool("--series", SERIES, "--check", pristine_tree)
    assert result.returncode == 0, output(result)
    assert "nothing written" in result.stdout
    assert not (pristine_tree / MARKER).exists()
    assert before == {rel: sha256_of(pristine_tree / rel) for rel in before}


def test_patched_tree_is_verified(patched_tree):
    result = apply_tool("--series", SERIES, "--verify", patched_tree)
    assert result.returncode == 0, output(result)


def test_refuses_a_hand_modified_target_file(real_target):
    first_patch = SERIES / series_patch_names(SERIES)[0]
    edited = re.search(r"^--- a/(\S+)", first_patch.read_text(), flags=re.MULTILINE).group(1)
    with (real_target / edited).open("a") as handle:
        handle.write("# local edit\n")
    result = apply_tool("--series", SERIES, real_target)
    assert result.returncode == 1, output(result)
    assert edited in output(result)
    assert "changed by something else" in output(result)
    assert not (real_target / MARKER).exists()


def test_refuses_vllm_0_25_1(tmp_path):
    """The real 0.25.1 wheel's dist-info, with and without an explicit series."""
    old_tree = os.environ.get("TQ_VLLM_OLD_TREE")
    if not old_tree:
        pytest.fail("TQ_VLLM_OLD_TREE is not set; run `make patches-check`", pytrace=False)
    target = copy_tree_subset(Path(old_tree), tmp_path / "old", ["vllm/__init__.py"])
    assert (target / "vllm-0.25.1.dist-info" / "METADATA").is_file()

    explicit = apply_tool("--series", SERIES, target)
    assert explicit.returncode == 2, output(explicit)
    message = explicit.stderr
    assert "vLLM 0.25.1 found at" in message and str(target) in message
    assert "is for vLLM 0.26.0" in message

    default = apply_tool(target)
    assert default.returncode == 2, output(default)
    assert "0.25.1" in default.stderr and "vllm-0.26.0" in default.stderr


def test_refuses_series_listing_a_missing_patch(tmp_path, pristine_tree):
    series_dir = tmp_path / "vllm-0.26.0"
    shutil.copytree(SERIES, series_dir)
    with (series_dir / "series").open("a") as handle:
        handle.write("9999-not-written-yet.patch\n")
    target = copy_tree_subset(pristine_tree, tmp_path / "site", [])
    result = apply_tool("--series", series_dir, target)
    assert result.returncode == 2, output(result)
    assert "9999-not-written-yet.patch" in result.stderr and "do not exist" in result.stderr


def test_run_in_vllm_imports_both_trees(pristine_tree, patched_tree):
    code = """
import json, vllm
from vllm.engine.arg_utils import EngineArgs
from vllm.v1.core import kv_cache_utils
from vllm.model_executor.layers.quantization.turboquant.config import TurboQuantConfig
print(json.dumps({"version": vllm.__version__, "file": vllm.__file__,
                  "kv_cache_utils": kv_cache_utils.__file__,
                  "presets": sorted(__import__("vllm.model_executor.layers.quantization.turboquant.config",
                                               fromlist=["TQ_PRESETS"]).TQ_PRESETS)}))
"""
    for tree in (pristine_tree, patched_tree):
        run = run_in_vllm(tree, code)
        assert run.returncode == 0, run.stderr[-4000:]
        report = run.json()
        assert report["version"] == "0.26.0"
        assert Path(report["file"]).is_relative_to(tree)
        assert Path(report["kv_cache_utils"]).is_relative_to(tree)
        assert report["presets"] == sorted(["turboquant_k8v4", "turboquant_4bit_nc",
                                            "turboquant_k3v4_nc", "turboquant_3bit_nc"])


# ----------------------------------------------------------------------------- synthetic series

VERSION = "9.9.9"


def make_tree(root: Path, files: dict[str, bytes]) -> Path:
    dist_info = root / f"vllm-{VERSION}.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {VERSION}\n\n")
    (root / "vllm").mkdir()
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def unified_diff(tmp: Path, rel: str, old: bytes | None, new: bytes | None) -> bytes:
    """A real `diff -u` with a/ b/ labels, as a patch author would make it."""
    work = tmp / "diffwork"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    old_file, new_file = work / "old", work / "new"
    if old is not None:
        old_file.write_bytes(old)
    if new is not None:
        new_file.write_bytes(new)
    labels = ["--label", "/dev/null" if old is None else f"a/{rel}",
              "--label", "/dev/null" if new is None else f"b/{rel}"]
    result = subprocess.run(["diff", "-u", *labels, str(old_file) if old is not None else "/dev/null",
                             str(new_file) if new is not None else "/dev/null"], capture_output=True)
    assert result.returncode == 1, result.stderr
    return result.stdout


def write_series(tmp: Path, patches: list[tuple[str, bytes]]) -> Path:
    series_dir = tmp / f"vllm-{VERSION}"
    series_dir.mkdir()
    for name, body in patches:
        (series_dir / name).write_bytes(body)
    (series_dir / "series").write_text("# synthetic\n" + "".join(f"{n}\n" for n, _ in patches))
    return series_dir


def tree_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes()
            for p in sorted((root / "vllm").rglob("*")) if p.is_file()}


LINES = b"".join(b"line %d\n" % i for i in range(1, 61))
EDGE_CASES = {
    "multiple_hunks": {"vllm/a.py": (LINES, LINES.replace(b"line 3\n", b"line three\n")
                                     .replace(b"line 30\n", b"line thirty\nextra\n")
                                     .replace(b"line 55\n", b""))},
    "new_file": {"vllm/new/created.py": (None, b"print('created')\n")},
    "deleted_file": {"vllm/gone.py": (b"bye\n", None)},
    "no_trailing_newline": {"vllm/nonl.py": (b"x = 1\ny = 2", b"x = 1\ny = 3"),
                            "vllm/add_newline.py": (b"a\nb", b"a\nb\n"),
                            "vllm/drop_newline.py": (b"a\nb\n", b"a\nc")},
    "pure_insert_and_delete": {"vllm/ins.py": (LINES, LINES.replace(b"line 20\n", b"line 20\nnew 1\nnew 2\n")),
                               "vllm/del.py": (LINES, LINES.replace(b"line 40\nline 41\n", b""))},
}


@pytest.mark.parametrize("case", sorted(EDGE_CASES))
def test_synthetic_edge_case_round_trip(tmp_path, case):
    changes = EDGE_CASES[case]
    old_files = {rel: old for rel, (old, _) in changes.items() if old is not None}
    new_files = {rel: new for rel, (_, new) in changes.items() if new is not None}
    header = b"Subject: synthetic " + case.encode() + b"\n\nWhy: exercise the diff engine.\n\n"
    body = b"".join(unified_diff(tmp_path, rel, old, new) for rel, (old, new) in changes.items())
    series_dir = write_series(tmp_path, [("0001-edge.patch", header + body)])
    pristine = make_tree(tmp_path / "pristine", old_files)
    target = make_tree(tmp_path / "target", old_files)

    refresh = apply_tool("--refresh-hashes", "--series", series_dir, pristine)
    assert refresh.returncode == 0, output(refresh)
    refreshed = (series_dir / "0001-edge.patch").read_bytes()
    hash_lines = [line for line in refreshed.splitlines() if line.startswith(b"Target-SHA256:")]
    assert len(hash_lines) == len(changes)
    # Only Target-SHA256 lines (and their blank separators) were added; text and diff are unchanged.
    kept = [line for line in refreshed.splitlines() if not line.startswith(b"Target-SHA256:")]
    assert [line for line in kept if line] == [line for line in (header + body).splitlines() if line]
    assert refreshed.endswith(body)
    assert tree_files(pristine) == {rel: data for rel, data in old_files.items()}

    applied = apply_tool("--series", series_dir, target)
    assert applied.returncode == 0, output(applied)
    files = tree_files(target)
    assert json.loads(files.pop(MARKER))["patches"] == ["0001-edge.patch"]
    assert files == new_files

    reverse = apply_tool("--series", series_dir, "--reverse", target)
    assert reverse.returncode == 0, output(reverse)
    assert tree_files(target) == old_files


def two_patch_series(tmp_path) -> tuple[Path, Path, Path]:
    """Two patches, the second made on top of the first's result for the same file."""
    step0 = LINES
    step1 = LINES.replace(b"line 10\n", b"line ten\n")
    step2 = step1.replace(b"line 50\n", b"line fifty\n")
    other = b"untouched by 0001\n"
    series_dir = write_series(tmp_path, [
        ("0001-first.patch", b"first\n\n" + unified_diff(tmp_path, "vllm/a.py", step0, step1)),
        ("0002-second.patch", b"second\n\n" + unified_diff(tmp_path, "vllm/a.py", step1, step2)
         + unified_diff(tmp_path, "vllm/b.py", other, other + b"added\n")),
    ])
    pristine = make_tree(tmp_path / "pristine", {"vllm/a.py": step0, "vllm/b.py": other})
    assert apply_tool("--refresh-hashes", "--series", series_dir, pristine).returncode == 0
    target = make_tree(tmp_path / "target", {"vllm/a.py": step0, "vllm/b.py": other})
    return series_dir, pristine, target


def test_failure_in_a_later_patch_writes_nothing_and_a_rerun_applies_all(tmp_path):
    """The whole series is checked before anything is written: 0002's refusal keeps 0001 unwritten."""
    series_dir, _, target = two_patch_series(tmp_path)
    original_b = (target / "vllm/b.py").read_bytes()
    (target / "vllm/b.py").write_bytes(b"someone else's edit\n")
    before = tree_files(target)

    failed = apply_tool("--series", series_dir, target)
    assert failed.returncode == 1, output(failed)
    assert re.search(r"checked\s+0001-first.patch", failed.stdout)
    assert not re.search(r"^\s+applied\s", failed.stdout, flags=re.MULTILINE)
    assert re.search(r"FAILED\s+0002-second.patch: vllm/b.py was changed by something else", failed.stdout)
    assert "nothing was written" in failed.stdout
    assert tree_files(target) == before  # 0001's change to a.py included
    assert not (target / MARKER).exists()
    assert apply_tool("--series", series_dir, "--verify", target).returncode == 1

    (target / "vllm/b.py").write_bytes(original_b)
    rerun = apply_tool("--series", series_dir, target)
    assert rerun.returncode == 0, output(rerun)
    assert re.search(r"^\s+applied\s+0001-first.patch", rerun.stdout, flags=re.MULTILINE)
    assert re.search(r"^\s+applied\s+0002-second.patch", rerun.stdout, flags=re.MULTILINE)
    assert apply_tool("--series", series_dir, "--verify", target).returncode == 0


def test_check_simulates_dependent_patches_without_writing(tmp_path):
    series_dir, pristine, target = two_patch_series(tmp_path)
    before = tree_files(target)
    check = apply_tool("--series", series_dir, "--check", target)
    assert check.returncode == 0, output(check)
    assert len(re.findall(r"^\s+would apply", check.stdout, flags=re.MULTILINE)) == 2
    assert tree_files(target) == before


def test_marker_records_series_hash(tmp_path):
    series_dir, _, target = two_patch_series(tmp_path)
    assert apply_tool("--series", series_dir, target).returncode == 0
    digest = hashlib.sha256()
    for name in ["series", "0001-first.patch", "0002-second.patch"]:
        digest.update(name.encode() + b"\0" + (series_dir / name).read_bytes())
    marker = json.loads((target / MARKER).read_text())
    assert marker == {"series": f"vllm-{VERSION}", "vllm_version": VERSION,
                      "patches": ["0001-first.patch", "0002-second.patch"],
                      "series_sha256": digest.hexdigest(), "tool": "tqstack patches/apply"}
    # Editing a patch's header text makes the recorded provenance stale, and --verify says so.
    patch = series_dir / "0001-first.patch"
    patch.write_bytes(b"reworded\n" + patch.read_bytes())
    stale = apply_tool("--series", series_dir, "--verify", target)
    assert stale.returncode == 1 and "stale" in stale.stdout
    assert apply_tool("--series", series_dir, target).returncode == 0
    assert apply_tool("--series", series_dir, "--verify", target).returncode == 0


def test_patch_without_hashes_or_with_bad_hunk_is_refused(tmp_path):
    old = LINES
    diff = unified_diff(tmp_path, "vllm/a.py", old, old.replace(b"line 7\n", b"seven\n"))
    series_dir = write_series(tmp_path, [("0001-x.patch", b"no hashes yet\n\n" + diff)])
    target = make_tree(tmp_path / "target", {"vllm/a.py": old})
    unhashed = apply_tool("--series", series_dir, target)
    assert unhashed.returncode == 2 and "--refresh-hashes" in output(unhashed)

    # The hunk's line numbers are wrong: refresh refuses and points at where the text really is.
    (series_dir / "0001-x.patch").write_bytes(b"x\n\n" + diff.replace(b"@@ -4,7 +4,7 @@", b"@@ -5,7 +5,7 @@"))
    shifted = apply_tool("--series", series_dir, "--refresh-hashes", target)
    assert shifted.returncode == 1, output(shifted)
    assert "does not match the file at line 5" in shifted.stdout and "its text is at line 4" in shifted.stdout
    assert tree_files(target) == {"vllm/a.py": old}


def test_default_target_is_found_without_importing_vllm(tmp_path):
    site = make_tree(tmp_path / "site", {"vllm/__init__.py": b"raise SystemExit('vllm was imported')\n"})
    result = apply_tool("--verify", env={"PYTHONPATH": str(site)})
    assert result.returncode == 2, output(result)
    assert f"vLLM {VERSION} found at {site}" in result.stderr
    assert "no patch series for it" in result.stderr and "vllm-0.26.0" in result.stderr
    assert "was imported" not in output(result)


def test_help_documents_exit_codes():
    result = apply_tool("--help")
    assert result.returncode == 0
    for code in ("0  success", "1  refused", "2  bad input"):
        assert code in result.stdout


def test_reverse_of_dependent_patches_restores_pristine(tmp_path):
    series_dir, pristine, target = two_patch_series(tmp_path)
    assert apply_tool("--series", series_dir, target).returncode == 0
    reverse = apply_tool("--series", series_dir, "--reverse", target)
    assert reverse.returncode == 0, output(reverse)
    assert reverse.stdout.index("0002-second.patch") < reverse.stdout.index("0001-first.patch")
    assert tree_files(target) == tree_files(pristine)
    again = apply_tool("--series", series_dir, "--reverse", target)
    assert again.returncode == 0
    assert len(re.findall(r"^\s+not applied", again.stdout, flags=re.MULTILINE)) == 2
