"""Generate the Python protobuf and gRPC modules for ortmux's API.

Usage: .venv-protoc/bin/python protos/generate.py [OUT_DIR]   (what ``make protos`` runs; OUT_DIR
defaults to the repository root)

Two fenced packages: ``ortmux.v1`` (the native API) goes to OUT_DIR/client (default client/),
and ``ortmux.worker.api.inference_v2`` (the Open Inference Protocol, package ``inference``, which
only the worker serves: the thin client must load beside tritonclient and kserve, which define
that package too) to OUT_DIR/worker (default worker/). The test suite runs this into a temporary directory and
diffs the result with the checked-in files, so edit the .proto files and rerun this script;
never edit the output by hand.

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
PACKAGES = {  # package directory under protos/ -> the top-level directory its code goes to
    Path("ortmux") / "v1": "client",
    Path("ortmux") / "worker" / "api" / "inference_v2": "worker",
}
DOCSTRINGS = {
    "v1": "Generated protobuf and gRPC modules of the ortmux v1 API (protos/generate.py).",
    "inference_v2": "Generated protobuf and gRPC modules of the KServe v2 protocol (protos/generate.py).",
}
PROTOC_VERSION = "1.72.2"  # keep in step with the Makefile's PROTOC_TOOLS


def _include_dirs() -> list[str]:
    """The well-known protos (google/protobuf) and google/rpc from googleapis-common-protos."""
    grpc_tools_protos = resources.files("grpc_tools") / "_proto"
    import google.rpc.status_pb2 as status_pb2  # the .proto files ship next to the modules

    googleapis_root = Path(status_pb2.__file__).resolve().parents[2]
    return [str(PROTO_ROOT), str(grpc_tools_protos), str(googleapis_root)]


def generate(root: Path) -> list[Path]:
    """Write every package's generated modules under ``root`` (client/..., worker/...) and return
    their paths."""
    if grpc_version.VERSION != PROTOC_VERSION:
        raise SystemExit(
            f"protos/generate.py needs grpcio-tools {PROTOC_VERSION}, this is {grpc_version.VERSION}: "
            "run `make protos`"
        )
    written = []
    for package, top in PACKAGES.items():
        out_dir = root / top
        package_out = out_dir / package
        package_out.mkdir(parents=True, exist_ok=True)
        protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / package).glob("*.proto"))
        args = ["grpc_tools.protoc"]
        args += [f"-I{include}" for include in _include_dirs()]
        args += [f"--python_out={out_dir}", f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}"]
        args += protos
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed on {protos}")
        (package_out / "__init__.py").write_text(f'"""{DOCSTRINGS[package.name]}"""\n')
        written += sorted(p for p in package_out.iterdir() if p.suffix in {".py", ".pyi"})
    return written


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO_ROOT
    for path in generate(target):
        print(path)
