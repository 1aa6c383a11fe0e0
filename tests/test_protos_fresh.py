"""The committed stubs in shardmesh/v1/ are exactly what scripts/gen_protos.py makes from protos/.

This is how CI fails when someone edits a .proto and forgets to regenerate (or edits generated
code by hand). Needs grpcio-tools from the `test` extra (pinned: its protoc decides the output).
"""

import filecmp
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
COMMITTED = ROOT / "shardmesh" / "v1"
HAND_WRITTEN = {"__init__.py"}
FIX = "run `python scripts/gen_protos.py` (with grpcio-tools from the test extra) and commit the result"


def generated_files(directory: pathlib.Path) -> set[str]:
    return {path.relative_to(directory).as_posix() for path in directory.rglob("*")
            if path.is_file() and "__pycache__" not in path.parts}


def test_generated_stubs_are_fresh(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--out", str(tmp_path)],
                   check=True, cwd=ROOT, timeout=120)
    fresh_root = tmp_path / "shardmesh" / "v1"
    assert generated_files(tmp_path) == {f"shardmesh/v1/{name}" for name in generated_files(fresh_root)}, \
        "protoc wrote outside shardmesh/v1/"
    fresh = generated_files(fresh_root)
    committed = generated_files(COMMITTED) - HAND_WRITTEN
    protos = sorted(path.stem for path in (ROOT / "protos" / "shardmesh" / "v1").glob("*.proto"))
    assert fresh == {f"{stem}{suffix}" for stem in protos for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")}
    assert not fresh - committed, f"stubs missing from shardmesh/v1/: {sorted(fresh - committed)}; {FIX}"
    assert not committed - fresh, f"stale files in shardmesh/v1/ (no .proto makes them): {sorted(committed - fresh)}"
    stale = [name for name in sorted(fresh) if not filecmp.cmp(fresh_root / name, COMMITTED / name, shallow=False)]
    assert not stale, f"stale generated stubs: {stale}; {FIX}"
