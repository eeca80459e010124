"""patches/apply never leaves a half-patched vLLM: checked on the real pinned 0.26.0 tree and series.

- A refusal anywhere in the series (a file edited by someone else) writes nothing at all.
- A file that cannot be written (immutable, or a failing rename) stops the run with the patch and
  the file named; every file stays whole, and a rerun finishes the half-applied patch.
- A run killed between two files of a patch (simulated by building that state) is finished by
  apply and undone by --reverse.
Patch counts and file lists are read from the series, so new patches need no edit here.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from test_apply import (APPLY, MARKER, SERIES, apply_tool, copy_tree_subset, output, series_patch_names,
                        sha256_of, touched_paths)


def files_by_patch(series_dir: Path) -> dict[str, list[str]]:
    """Each patch's files, in the order its diffs list them (the order patches/apply writes them)."""
    result = {}
    for name in series_patch_names(series_dir):
        text = (series_dir / name).read_text()
        paths = re.findall(r"^\+\+\+ b/(\S+)", text, flags=re.MULTILINE)
        result[name] = list(dict.fromkeys(paths))
    return result


def patch_named(prefix: str) -> str:
    matches = [name for name in series_patch_names(SERIES) if name.startswith(prefix)]
    assert len(matches) == 1, f"expected one patch named {prefix}* in {SERIES / 'series'}: {matches}"
    return matches[0]


def first_patch_touching(rel: str) -> str:
    return next(name for name, paths in files_by_patch(SERIES).items() if rel in paths)


def last_patch_touching(rel: str) -> str:
    return [name for name, paths in files_by_patch(SERIES).items() if rel in paths][-1]


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under root with its bytes and mode: a refusal must leave all of it as it was."""
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mode)
            for p in sorted(root.rglob("*")) if p.is_file()}


def leftover_temp_files(root: Path) -> list[str]:
    return [str(p.relative_to(root)) for p in root.rglob(".*.tmp")]


def hashes(root: Path, paths) -> dict[str, str | None]:
    return {rel: sha256_of(root / rel) if (root / rel).exists() else None for rel in sorted(paths)}


TOUCHED = sorted(touched_paths(SERIES))
PATCH_WITH_TWO_FILES = "0004-"  # the gate-2 patch: vllm/platforms/cuda.py and models/config.py


@pytest.fixture
def pristine_copy(tmp_path, pristine_tree) -> Path:
    return copy_tree_subset(pristine_tree, tmp_path / "site-packages", TOUCHED)


@pytest.fixture
def patched_copy(tmp_path, patched_tree) -> Path:
    target = copy_tree_subset(patched_tree, tmp_path / "patched-site-packages", [*TOUCHED, MARKER])
    assert apply_tool("--series", SERIES, "--verify", target).returncode == 0
    return target


def truncated_series(tmp_path: Path, count: int) -> Path:
    """The first `count` patches of the series (same patch files, shorter series list)."""
    series_dir = tmp_path / f"series-{count}" / SERIES.name
    series_dir.mkdir(parents=True)
    for name in series_patch_names(SERIES):
        shutil.copy2(SERIES / name, series_dir / name)
    (series_dir / "series").write_text("".join(f"{name}\n" for name in series_patch_names(SERIES)[:count]))
    return series_dir


def tree_with_first_patches(tmp_path: Path, pristine_tree: Path, count: int, name: str) -> Path:
    target = copy_tree_subset(pristine_tree, tmp_path / name, TOUCHED)
    if count:
        applied = apply_tool("--series", truncated_series(tmp_path, count), target)
        assert applied.returncode == 0, output(applied)
        (target / MARKER).unlink()  # the marker of a shorter series is not this series' marker
    return target


# ----------------------------------------------------------------------------- refusals write nothing

@pytest.mark.parametrize("tampered", TOUCHED)
def test_a_refusal_anywhere_in_the_series_writes_nothing(pristine_copy, tampered):
    """E.g. kv_cache_utils.py (0009/0010) or turboquant_attn.py edited by hand: before, every
    patch ahead of the first one touching it had already been written."""
    # A file the series creates is "tampered" by existing already.
    (pristine_copy / tampered).parent.mkdir(parents=True, exist_ok=True)
    with (pristine_copy / tampered).open("a") as handle:
        handle.write("# local edit\n")
    before = snapshot(pristine_copy)

    result = apply_tool("--series", SERIES, pristine_copy)
    assert result.returncode == 1, output(result)
    assert re.search(rf"FAILED\s+{re.escape(first_patch_touching(tampered))}: {re.escape(tampered)} "
                     "was changed by something else", result.stdout), result.stdout
    assert "nothing was written" in result.stdout
    assert snapshot(pristine_copy) == before
    assert not (pristine_copy / MARKER).exists()
    assert leftover_temp_files(pristine_copy) == []


@pytest.mark.parametrize("tampered", TOUCHED)
def test_a_refused_reverse_writes_nothing(patched_copy, tampered):
    with (patched_copy / tampered).open("a") as handle:
        handle.write("# local edit\n")
    before = snapshot(patched_copy)

    result = apply_tool("--series", SERIES, "--reverse", patched_copy)
    assert result.returncode == 1, output(result)
    assert re.search(rf"FAILED\s+{re.escape(last_patch_touching(tampered))}: ", result.stdout), result.stdout
    assert "nothing was written" in result.stdout
    assert snapshot(patched_copy) == before


# ----------------------------------------------------------------------------- a run cut short between files

@pytest.fixture(params=["first file written", "second file written"])
def half_applied(request, tmp_path, pristine_tree) -> tuple[Path, str, str, str]:
    """The state a kill between the two file writes of the 0004 patch leaves: the patches before it
    applied, one of its files at its after hash, the other at its before hash, no marker.
    Returns (target, patch name, the written file, the unwritten file)."""
    names = series_patch_names(SERIES)
    patch = patch_named(PATCH_WITH_TWO_FILES)
    files = files_by_patch(SERIES)[patch]
    assert len(files) == 2, files
    written, unwritten = files if request.param == "first file written" else files[::-1]
    index = names.index(patch)
    target = tree_with_first_patches(tmp_path, pristine_tree, index, "half-applied")
    with_patch = tree_with_first_patches(tmp_path, pristine_tree, index + 1, "with-patch")
    shutil.copy2(with_patch / written, target / written)
    assert sha256_of(target / written) != sha256_of(pristine_tree / written)
    assert sha256_of(target / unwritten) == sha256_of(pristine_tree / unwritten)
    return target, patch, written, unwritten


def test_verify_and_check_report_a_half_applied_patch_without_writing(half_applied):
    target, patch, _, _ = half_applied
    before = snapshot(target)
    verify = apply_tool("--series", SERIES, "--verify", target)
    assert verify.returncode == 1, output(verify)
    assert "half applied" in verify.stdout and patch in verify.stdout
    check = apply_tool("--series", SERIES, "--check", target)
    assert check.returncode == 0, output(check)
    assert re.search(rf"would finish \(apply\)\s+{re.escape(patch)}", check.stdout), check.stdout
    reverse_check = apply_tool("--series", SERIES, "--reverse", "--check", target)
    assert reverse_check.returncode == 0, output(reverse_check)
    assert snapshot(target) == before


def test_apply_finishes_a_half_applied_patch(half_applied, patched_tree):
    target, patch, written, unwritten = half_applied
    result = apply_tool("--series", SERIES, target)
    assert result.returncode == 0, output(result)
    # Only the missing file is written; the rest of the series follows as usual.
    assert re.search(rf"finished \(applied\)\s+{re.escape(patch)}: {re.escape(unwritten)}$", result.stdout,
                     flags=re.MULTILINE), result.stdout
    assert hashes(target, TOUCHED) == hashes(patched_tree, TOUCHED)
    assert apply_tool("--series", SERIES, "--verify", target).returncode == 0


def test_reverse_undoes_a_half_applied_patch(half_applied, pristine_tree):
    target, patch, written, _ = half_applied
    result = apply_tool("--series", SERIES, "--reverse", target)
    assert result.returncode == 0, output(result)
    assert re.search(rf"finished \(reverted\)\s+{re.escape(patch)}: {re.escape(written)}$", result.stdout,
                     flags=re.MULTILINE), result.stdout
    assert hashes(target, TOUCHED) == hashes(pristine_tree, TOUCHED)
    assert not (target / MARKER).exists()


def test_a_half_applied_patch_whose_files_moved_on_is_refused(pristine_copy, patched_tree):
    """kv_cache_utils.py fully patched (0009 and 0010) beside a pristine platforms/interface.py: the
    first patch touching it is half applied, but not by an interrupted run (a later patch is on top
    of one of its files). That needs a person; nothing is written either way."""
    rel = "vllm/v1/core/kv_cache_utils.py"
    patch = first_patch_touching(rel)
    assert len(files_by_patch(SERIES)[patch]) >= 2 and last_patch_touching(rel) != patch
    shutil.copy2(patched_tree / rel, pristine_copy / rel)
    before = snapshot(pristine_copy)
    for mode in ([], ["--reverse"]):
        result = apply_tool("--series", SERIES, *mode, pristine_copy)
        assert result.returncode == 1, output(result)
        assert re.search(rf"FAILED\s+{re.escape(patch)}: the patch is half applied", result.stdout), result.stdout
        assert "nothing was written" in result.stdout
        assert snapshot(pristine_copy) == before


# ----------------------------------------------------------------------------- files that cannot be written

FAILING_RENAME = """
import errno, os, runpy, sys
blocked = os.path.abspath(os.environ["TQ_TEST_BLOCKED_FILE"])
real_replace = os.replace
def replace(src, dst, *args, **kwargs):
    if os.path.abspath(dst) == blocked:
        raise PermissionError(errno.EPERM, os.strerror(errno.EPERM), dst)
    return real_replace(src, dst, *args, **kwargs)
os.replace = replace
sys.argv = [sys.argv[1], *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def apply_with_failing_rename(blocked: Path, *args) -> subprocess.CompletedProcess:
    """patches/apply in a subprocess whose os.replace onto `blocked` fails with EPERM."""
    return subprocess.run([sys.executable, "-c", FAILING_RENAME, str(APPLY), *map(str, args)],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "TQ_TEST_BLOCKED_FILE": str(blocked)})


def assert_stopped_in_the_middle_of(result, target: Path, pristine_tree: Path, patch: str,
                                    written: str, blocked: str) -> None:
    assert result.returncode == 1, output(result)
    # The I/O error line names the patch and the file.
    assert re.search(rf"FAILED\s+{re.escape(patch)}: cannot write {re.escape(blocked)}: Operation not permitted",
                     result.stdout), output(result)
    assert f"stopped at {patch}" in result.stdout
    assert sha256_of(target / written) != sha256_of(pristine_tree / written)
    assert sha256_of(target / blocked) == sha256_of(pristine_tree / blocked)
    assert leftover_temp_files(target) == []
    assert not (target / MARKER).exists()
    verify = apply_tool("--series", SERIES, "--verify", target)
    assert verify.returncode == 1 and "half applied" in verify.stdout, output(verify)


@pytest.mark.parametrize("then", ["apply", "reverse"])
def test_a_failing_write_names_the_patch_and_a_rerun_recovers(pristine_copy, pristine_tree, patched_tree, then):
    patch = patch_named(PATCH_WITH_TWO_FILES)
    written, blocked = files_by_patch(SERIES)[patch]
    result = apply_with_failing_rename(pristine_copy / blocked, "--series", SERIES, pristine_copy)
    assert_stopped_in_the_middle_of(result, pristine_copy, pristine_tree, patch, written, blocked)
    for earlier in series_patch_names(SERIES)[:series_patch_names(SERIES).index(patch)]:
        assert re.search(rf"^\s+applied\s+{re.escape(earlier)}", result.stdout, flags=re.MULTILINE)

    if then == "apply":
        rerun = apply_tool("--series", SERIES, pristine_copy)
        assert rerun.returncode == 0, output(rerun)
        assert hashes(pristine_copy, TOUCHED) == hashes(patched_tree, TOUCHED)
        assert apply_tool("--series", SERIES, "--verify", pristine_copy).returncode == 0
    else:
        reverse = apply_tool("--series", SERIES, "--reverse", pristine_copy)
        assert reverse.returncode == 0, output(reverse)
        assert hashes(pristine_copy, TOUCHED) == hashes(pristine_tree, TOUCHED)


def test_an_immutable_file_stops_the_run_with_every_file_whole(pristine_copy, pristine_tree, patched_tree):
    """chattr +i, as on a read-only image layer or a locked-down site-packages."""
    patch = patch_named(PATCH_WITH_TWO_FILES)
    written, blocked = files_by_patch(SERIES)[patch]
    immutable = pristine_copy / blocked
    attr = subprocess.run(["chattr", "+i", str(immutable)], capture_output=True, text=True)
    if attr.returncode != 0:
        pytest.skip(f"chattr +i is not available here (needs root and ext4/xfs): {attr.stderr.strip()}")
    try:
        result = apply_tool("--series", SERIES, pristine_copy)
    finally:
        subprocess.run(["chattr", "-i", str(immutable)], check=True)
    assert_stopped_in_the_middle_of(result, pristine_copy, pristine_tree, patch, written, blocked)
    rerun = apply_tool("--series", SERIES, pristine_copy)
    assert rerun.returncode == 0, output(rerun)
    assert hashes(pristine_copy, TOUCHED) == hashes(patched_tree, TOUCHED)


def test_apply_and_reverse_keep_file_modes_and_leave_no_temp_files(pristine_copy):
    existing = [rel for rel in TOUCHED if (pristine_copy / rel).exists()]
    modes = {rel: (0o640, 0o755)[index % 2] for index, rel in enumerate(existing)}
    for rel, mode in modes.items():
        os.chmod(pristine_copy / rel, mode)
    for args in ([], ["--reverse"]):
        result = apply_tool("--series", SERIES, *args, pristine_copy)
        assert result.returncode == 0, output(result)
        for rel, mode in modes.items():
            assert (pristine_copy / rel).stat().st_mode & 0o7777 == mode, rel
        assert leftover_temp_files(pristine_copy) == []
