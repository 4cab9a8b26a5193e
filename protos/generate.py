"""Generate the Python protobuf and gRPC modules for ortmux's API.

Usage: .venv-protoc/bin/python protos/generate.py [OUT_DIR]   (what ``make protos`` runs)

OUT_DIR defaults to client/, which receives the package ``ortmux.v1`` (the only place generated
code lives). The test suite runs this into a temporary directory and diffs the result with the
checked-in files, so edit the .proto files and rerun this script; never edit the output by hand.

It must run under grpcio-tools 1.72.2 (its own venv: that release needs protobuf < 7, the worker's
grpcio companions need >= 7.35.1). Its code is stamped protobuf 6.30.0 and gRPC 1.72.2, so the thin
client loads on protobuf 6.30 through 7.x and grpcio >= 1.72.2, beside tritonclient and kserve.
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

from grpc_tools import grpc_version, protoc

PROTO_ROOT = Path(__file__).resolve().parent
REPO_ROOT = PROTO_ROOT.parent
DEFAULT_OUT = REPO_ROOT / "client"
PACKAGE_DIR = Path("ortmux") / "v1"
PROTOC_VERSION = "1.72.2"  # keep in step with the Makefile's PROTOC_TOOLS


def _include_dirs() -> list[str]:
    """The well-known protos (google/protobuf) and google/rpc from googleapis-common-protos."""
    grpc_tools_protos = resources.files("grpc_tools") / "_proto"
    import google.rpc.status_pb2 as status_pb2  # the .proto files ship next to the modules

    googleapis_root = Path(status_pb2.__file__).resolve().parents[2]
    return [str(PROTO_ROOT), str(grpc_tools_protos), str(googleapis_root)]


def generate(out_dir: Path) -> list[Path]:
    """Write the generated modules under ``out_dir/ortmux/v1`` and return their paths."""
    if grpc_version.VERSION != PROTOC_VERSION:
        raise SystemExit(
            f"protos/generate.py needs grpcio-tools {PROTOC_VERSION}, this is {grpc_version.VERSION}: "
            "run `make protos`"
        )
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
