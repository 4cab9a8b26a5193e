"""The ``ortmux`` command: ``serve`` runs a worker; ``models`` and ``infer`` talk to one.

The client commands need only the thin client; ``serve`` needs the ``worker`` extra.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ortmux.worker import cli_models

DEFAULT_TARGET = "127.0.0.1:50051"


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "serve":
        args.rest = rest  # the serve flags come from the settings fields
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return int(args.handler(args, parser) or 0)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ortmux", description="Serve many adapters of one ONNX base model.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = commands.add_parser(
        "serve", help="run a worker (ortmux serve --help for its flags)", add_help=False
    )
    serve.set_defaults(handler=_serve)

    models = commands.add_parser("models", help="list the models a worker serves, with inputs and outputs")
    models.set_defaults(handler=cli_models.models)
    _add_target(models)

    inspect = commands.add_parser(
        "inspect",
        help="list a model file's adaptable projections as PEFT names them (before training)",
    )
    inspect.set_defaults(handler=cli_models.inspect)
    inspect.add_argument("model_path", type=Path, metavar="MODEL.onnx")

    infer = commands.add_parser("infer", help="run one request and summarise its outputs")
    infer.set_defaults(handler=_infer)
    _add_target(infer)
    infer.add_argument("--model", required=True, help="base model name")
    infer.add_argument("--adapter", default=None, help="adapter id (default: the base model)")
    infer.add_argument(
        "--input",
        dest="inputs",
        action="append",
        default=[],
        metavar="NAME=FILE.npy",
        help="an input; repeatable",
    )
    infer.add_argument("--output-dir", type=Path, default=None, help="save each output as NAME.npy here")

    generate = commands.add_parser("generate", help="generate text with a decoder, streaming it as it comes")
    generate.set_defaults(handler=_generate)
    _add_target(generate)
    generate.add_argument("--model", required=True, help="base model name")
    generate.add_argument("--adapter", default="", help="adapter id (default: the base model)")
    generate.add_argument("--max-new-tokens", type=int, default=64)
    generate.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    generate.add_argument("--top-k", type=int, default=0)
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.add_argument("--seed", type=int, default=None)
    generate.add_argument("--stop", action="append", default=[], help="a stop string; repeatable")
    generate.add_argument("prompt", help="the prompt text")

    adapters = commands.add_parser("adapters", help="register, list and delete adapters")
    adapter_commands = adapters.add_subparsers(dest="adapter_command", metavar="ACTION", required=True)
    register = adapter_commands.add_parser(
        "register", help="upload an adapter (a PEFT directory, archive or file)"
    )
    register.set_defaults(handler=_adapters_register)
    _add_target(register)
    register.add_argument("--model", required=True)
    register.add_argument("--id", dest="adapter_id", required=True)
    register.add_argument(
        "path", type=Path, help="PEFT directory, .tar/.zip of one, .onnx_adapter, .safetensors or .npz"
    )
    register.add_argument("--format", choices=["peft_lora", "ort_adapter", "weight_override"], default=None)
    register.add_argument("--pinned", action="store_true", help="keep it in memory whatever the budget")
    register.add_argument("--replace", action="store_true", help="overwrite an adapter of the same id")
    register.add_argument(
        "--mapping", type=Path, default=None, help="JSON file mapping module names to weights"
    )
    listing = adapter_commands.add_parser("list", help="list adapters")
    listing.set_defaults(handler=_adapters_list)
    _add_target(listing)
    listing.add_argument("--model", default=None)
    delete = adapter_commands.add_parser("delete", help="delete an adapter")
    delete.set_defaults(handler=_adapters_delete)
    _add_target(delete)
    delete.add_argument("--model", required=True)
    delete.add_argument("--id", dest="adapter_id", required=True)
    return parser


def _add_target(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default=DEFAULT_TARGET, help=f"worker address (default {DEFAULT_TARGET})")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per call (default 30)")
    parser.add_argument(
        "--api-key",
        default=os.environ.get("ORTMUX_API_KEY"),
        help="API key for a worker with tenants (default: $ORTMUX_API_KEY)",
    )


def _serve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        from ortmux.worker.api.server import start_worker
        from ortmux.worker.errors import WorkerError
        from ortmux.worker.settings import Settings, add_arguments
    except ImportError as exc:
        print(f"ortmux serve needs the worker extra (pip install 'ortmux[worker]'): {exc}", file=sys.stderr)
        return 2
    serve_parser = argparse.ArgumentParser(prog="ortmux serve", description="Run an ortmux worker.")
    add_arguments(serve_parser)
    serve_parser.parse_args(args.rest)  # --help and unknown flags are answered here
    try:
        settings = Settings.load(args.rest)
    except WorkerError as exc:
        print(f"ortmux serve: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        worker = start_worker(settings)
    except WorkerError as exc:
        logging.getLogger("ortmux").error("cannot start: %s", exc)
        return 1
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        logging.getLogger("ortmux").info("%s: draining", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    names = ", ".join(model.name for model in worker.dataplane.list_models())
    logging.getLogger("ortmux").info("serving %s on port %d", names, worker.port)
    stop.wait()
    worker.stop()
    return 0


def _infer(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from ortmux.client import Client, OrtmuxError

    inputs: dict[str, np.ndarray] = {}
    for entry in args.inputs:
        name, sep, file = entry.partition("=")
        if not sep or not name or not file:
            parser.error(f"--input {entry!r} is not NAME=FILE.npy")
        try:
            inputs[name] = np.load(file, allow_pickle=False)
        except (OSError, ValueError) as exc:
            parser.error(f"--input {name}: cannot read {file}: {exc}")
    try:
        with Client(args.target, timeout=args.timeout, api_key=args.api_key) as client:
            outputs = client.infer(args.model, inputs, adapter=args.adapter)
    except OrtmuxError as exc:
        print(f"ortmux infer: {exc.code.name}: {exc.message}", file=sys.stderr)
        return 1
    for name, array in outputs.items():
        print(f"{name}: {array.dtype.name}{list(array.shape)} {_summary(array)}")
        if args.output_dir is not None:
            args.output_dir.mkdir(parents=True, exist_ok=True)
            np.save(args.output_dir / f"{name}.npy", array)
    return 0


_PROGRESS_FROM_BYTES = 4 << 20


def _generate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from ortmux.client import Client, OrtmuxError

    try:
        with Client(args.target, timeout=args.timeout, api_key=args.api_key) as client:
            chunks = client.generate(
                args.model,
                prompt=args.prompt,
                adapter=args.adapter,
                max_new_tokens=args.max_new_tokens,
                temperature=args.temperature,
                top_k=args.top_k,
                top_p=args.top_p,
                seed=args.seed,
                stop=args.stop,
                timeout=args.timeout,
            )
            for chunk in chunks:
                print(chunk.text, end="", flush=True)
                if chunk.finish_reason and chunk.usage is not None:
                    usage = chunk.usage
                    print(
                        f"\n[{chunk.finish_reason}: {usage.prompt_tokens} prompt + "
                        f"{usage.completion_tokens} generated tokens]",
                        file=sys.stderr,
                    )
    except OrtmuxError as exc:
        print(f"ortmux generate: {exc.code.name}: {exc.message}", file=sys.stderr)
        return 1
    return 0


def _progress_bar(sent: int, total: int) -> None:
    if total < _PROGRESS_FROM_BYTES:
        return
    width = 30
    done = width * sent // total
    sys.stderr.write(f"\r[{'#' * done}{'.' * (width - done)}] {sent >> 20}/{total >> 20} MiB")
    if sent == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def _adapters_register(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import json

    from ortmux.client import Client, OrtmuxError

    mapping = None
    if args.mapping is not None:
        try:
            mapping = json.loads(args.mapping.read_text())
        except (OSError, ValueError) as exc:
            parser.error(f"--mapping {args.mapping}: {exc}")
    try:
        with Client(args.target, timeout=args.timeout, api_key=args.api_key) as client:
            info = client.register_adapter(
                args.model,
                args.adapter_id,
                args.path,
                format=args.format,
                pinned=args.pinned,
                replace=args.replace,
                module_mapping=mapping,
                progress=_progress_bar,
            )
    except (OSError, ValueError) as exc:
        parser.error(str(exc))
    except OrtmuxError as exc:
        print(f"ortmux adapters register: {exc.code.name}: {exc.message}", file=sys.stderr)
        return 1
    targets = len(info.targets)
    print(f"registered {info.model}/{info.adapter_id}: {info.format}, rank {info.rank}, {targets} targets")
    return 0


def _adapters_list(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from ortmux.client import Client, OrtmuxError

    try:
        with Client(args.target, timeout=args.timeout, api_key=args.api_key) as client:
            adapters = client.list_adapters(args.model)
    except OrtmuxError as exc:
        print(f"ortmux adapters list: {exc.code.name}: {exc.message}", file=sys.stderr)
        return 1
    print(f"{'MODEL':<16} {'ADAPTER':<32} {'FORMAT':<16} {'RANK':>4} {'BYTES':>10} RESIDENT")
    for info in adapters:
        print(
            f"{info.model:<16} {info.adapter_id:<32} {info.format:<16} {info.rank:>4} {info.size_bytes:>10} "
            f"{'yes' if info.resident else 'no'}{' (pinned)' if info.pinned else ''}"
        )
    return 0


def _adapters_delete(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from ortmux.client import Client, OrtmuxError

    try:
        with Client(args.target, timeout=args.timeout, api_key=args.api_key) as client:
            client.delete_adapter(args.model, args.adapter_id)
    except OrtmuxError as exc:
        print(f"ortmux adapters delete: {exc.code.name}: {exc.message}", file=sys.stderr)
        return 1
    print(f"deleted {args.model}/{args.adapter_id}")
    return 0


def _summary(array: np.ndarray) -> str:
    if array.size == 0:
        return "(empty)"
    if array.dtype.kind in "fiu":
        values = array.astype(np.float64)
        return f"min={values.min():.4g} max={values.max():.4g} mean={values.mean():.4g}"
    return f"true={int(np.count_nonzero(array))}/{array.size}"


if __name__ == "__main__":
    sys.exit(main())
