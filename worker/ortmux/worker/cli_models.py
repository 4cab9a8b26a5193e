"""The ``inspect`` and ``models`` commands: what a model's adapters can target, from its file or
from a running worker."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence


@dataclasses.dataclass(frozen=True)
class Use:
    """One adaptable projection as ``inspect`` and ``models`` print it."""

    module: str
    weight: str
    in_features: int
    out_features: int
    rule: str
    layout: str
    node: str
    per_row: bool
    group: str


def print_projections(
    adaptable: Sequence[Use],
    unadaptable: Sequence[tuple[str, str, str, str]],
    fused: Sequence[str],
) -> None:
    """The LoRA view of a model: what adapters can target (module as PEFT names it) and what not.
    A module called more than once lists every call (each takes the adapter's branch)."""
    print(f"  adaptable projections: {len(adaptable)}")
    groups: dict[str, list[Use]] = {}
    for use in adaptable:
        groups.setdefault(use.group or use.weight, []).append(use)
    width = max((len(calls[0].module or "?") for calls in groups.values()), default=0)
    for calls in groups.values():
        first = calls[0]
        whole = "" if all(use.per_row for use in calls) else ", one adapter per run"
        print(
            f"    {first.module or '?':{width}s}  {first.in_features} -> {first.out_features}  weight "
            f"{first.weight}  ({first.rule or 'unnamed'}, {first.layout}{whole})"
        )
        if len(calls) > 1:
            for use in calls:
                shared = "per row" if use.per_row else "activation shared by every row"
                print(f"      call {use.node or '?'}  ({use.layout}, {shared})")
        tied = [
            other[0].module or "?"
            for other in groups.values()
            if other is not calls and other[0].weight == first.weight
        ]
        if tied:
            print(f"      weight also read by {', '.join(tied)} (tied: adapted only when targeted itself)")
    if unadaptable:
        print(f"  projections that cannot take a LoRA branch: {len(unadaptable)}")
        for node, op_type, module, reason in unadaptable:
            print(f"    {op_type} {node}{f' ({module})' if module else ''}: {reason}")
    if fused:
        print(f"  fused nodes no branch can reach: {', '.join(fused)}")


def layout(layout: str, quantized: str) -> str:
    return f"{layout}, through {quantized}" if quantized else layout


def inspect(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        import onnx

        from ortmux.worker.engine.lora.targets import find_sites
        from ortmux.worker.engine.paged import kv_cache_path
    except ImportError as exc:
        print(f"ortmux inspect needs the worker extra (pip install 'ortmux[worker]'): {exc}", file=sys.stderr)
        return 2
    try:
        model = onnx.load(str(args.model_path), load_external_data=False)
    except Exception as exc:
        print(f"ortmux inspect: {args.model_path} cannot be read: {exc}", file=sys.stderr)
        return 1
    report = find_sites(model)
    print(args.model_path)
    print_projections(
        [
            Use(
                s.module,
                s.weight,
                s.in_features,
                s.out_features,
                s.rule,
                layout(s.layout, s.quantized),
                s.node,
                s.per_row,
                s.call_group,
            )
            for s in report.sites
        ],
        [(u.node, u.op_type, u.module, u.reason) for u in report.unadaptable],
        report.fused,
    )
    firsts = {site.call_group: site for site in reversed(report.sites)}.values()  # each group's first
    modules = sorted({site.module.rsplit(".", 1)[-1] for site in firsts if site.module})
    if modules:
        print(f"  PEFT target_modules: {', '.join(modules)}")
    print(f"  KV cache: {kv_cache_path(model)}")
    return 0


def models(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from ortmux.client import Client, OrtmuxError

    try:
        with Client(args.target, timeout=args.timeout, api_key=args.api_key) as client:
            for summary in client.list_models():
                info = client.model_info(summary.name)
                print(info.name)
                for label, specs in (("input ", info.inputs), ("output", info.outputs)):
                    for spec in specs:
                        print(f"  {label} {spec.name}: {spec.dtype}{list(spec.shape)}")
                if info.generates:
                    context = info.context_length or "not stated"
                    text = "text or token ids" if info.has_tokenizer else "token ids only (no tokenizer.json)"
                    print(f"  generates: context {context}, takes {text}")
                    print(f"  kv cache: {info.kv_cache} ({info.kv_cache_reason})")
                lora = [t for t in info.adapter_targets if t.kind == "lora"]
                print_projections(
                    [
                        Use(
                            t.module,
                            t.weight,
                            t.shape[0],
                            t.shape[1],
                            t.rule,
                            layout(t.layout, t.quantized_op),
                            t.node,
                            t.per_row,
                            t.group,
                        )
                        for t in lora
                    ],
                    [(u.node, u.op_type, u.module, u.reason) for u in info.unadaptable],
                    info.fused_nodes,
                )
    except OrtmuxError as exc:
        print(f"ortmux models: {exc.code.name}: {exc.message}", file=sys.stderr)
        return 1
    return 0
