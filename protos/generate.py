"""Generate the Python protobuf and gRPC modules for ortmux's API.

Usage: python protos/generate.py [OUT_DIR]

OUT_DIR defaults to client/, which receives the package ``ortmux.v1`` (the only place generated
code lives). The test suite runs this into a temporary directory and diffs the result with the
checked-in files, so edit the .proto files and rerun this script; never edit the output by hand.
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parent
REPO_ROOT = PROTO_ROOT.parent
DEFAULT_OUT = REPO_ROOT / "client"
PACKAGE_DIR = Path("ortmux") / "v1"


def _include_dirs() -> list[str]:
    """The well-known protos (google/protobuf) and google/rpc from googleapis-common-protos."""
    grpc_tools_protos = resources.files("grpc_tools") / "_proto"
    import google.rpc.status_pb2 as status_pb2  # the .proto files ship next to the modules

    googleapis_root = Path(status_pb2.__file__).resolve().parents[2]
    return [str(PROTO_ROOT), str(grpc_tools_protos), str(googleapis_root)]


def generate(out_dir: Path) -> list[Path]:
    """Write the generated modules under ``out_dir/ortmux/v1`` and return their paths."""
    package_out = out_dir / PACKAGE_DIR
    package_out.mkdir(parents=True, exist_ok=True)
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / PACKAGE_DIR).glob("*.proto"))
    args = ["grpc_tools.protoc"]
    args += [f"-I{include}" for include in _include_dirs()]
    args += [f"--python_out={out_dir}", f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}"]
    args += protos
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed on {protos}")
    init = package_out / "__init__.py"
    init.write_text('"""Generated protobuf and gRPC modules of the ortmux v1 API (protos/generate.py)."""\n')
    return sorted(p for p in package_out.iterdir() if p.suffix in {".py", ".pyi"})


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT
    for path in generate(target):
        print(path)
