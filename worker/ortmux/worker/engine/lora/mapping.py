"""Which LoRA sites each module an adapter targets maps to (PEFT names against the graph's).

A module maps to one call group (:mod:`~ortmux.worker.engine.lora.uses`): the sites of every call
of it. A module whose group also has a use no branch can take is refused, never applied partially.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ortmux.worker.engine.lora.targets import LoraSite, Unadaptable
from ortmux.worker.engine.quantized_ops import QUANTIZED_OUTPUT, replaced_by
from ortmux.worker.errors import FailedPrecondition, InvalidArgument


def _matches(module: str, name: str) -> bool:
    """Equal, or equal on whole trailing path components (one side has a wrapper prefix)."""
    return module == name or module.endswith("." + name) or name.endswith("." + module)


def map_modules(
    sites: Sequence[LoraSite],
    modules: Sequence[str],
    explicit: Mapping[str, str] | None = None,
    unadaptable: Sequence[Unadaptable] = (),
    fused: Sequence[str] = (),
) -> dict[str, LoraSite]:
    """Module name -> a site of its call group (the factors are held under
    :attr:`LoraSite.call_group`) for every module an adapter targets; every miss is listed at once.

    ``explicit`` maps module names to initializer names and wins over the names in the graph. An
    exact name wins over a prefix-tolerant match; two candidates of the same kind are refused.
    """
    by_weight: dict[str, LoraSite] = {}
    for site in sites:
        by_weight.setdefault(site.weight, site)
    mapped: dict[str, LoraSite] = {}
    problems = []
    for module in modules:
        if explicit and module in explicit:
            weight = explicit[module]
            site = by_weight.get(weight) or by_weight.get(replaced_by(weight, by_weight) or "")
            if site is None:
                problems.append(f"{module} -> {explicit[module]} (mapping names no adaptable weight)")
            else:
                mapped[module] = site
            continue
        exact = _unique(site for site in sites if module in site.names)
        candidates = exact or _unique(
            site for site in sites if any(_matches(module, name) for name in site.names)
        )
        if len(candidates) == 1:
            mapped[module] = candidates[0]
            continue
        if candidates:
            problems.append(
                f"{module} (ambiguous: " + ", ".join(f"{s.weight} ({s.module})" for s in candidates) + ")"
            )
            continue
        blocked = [u for u in unadaptable if u.module and _matches(module, u.module)]
        if blocked and blocked[0].op_type in QUANTIZED_OUTPUT:
            raise FailedPrecondition(
                f"cannot map adapter module '{module}': its projection {blocked[0].node} is "
                f"{blocked[0].reason}",
                field="target_modules",
            )
        if blocked:
            problems.append(
                f"{module} (its projection {blocked[0].node} cannot take a branch: {blocked[0].reason})"
            )
        elif fused:
            raise FailedPrecondition(
                f"cannot map adapter module '{module}': the base graph holds fused nodes "
                f"({', '.join(fused[:4])}) whose packed projection weights no LoRA branch can take; "
                "serve the model as exported, before ONNX Runtime's transformer optimizer or "
                "Optimum's ORTOptimizer fused it (e.g. `optimum-cli export onnx` without --optimize)",
                field="target_modules",
            )
        else:
            problems.append(f"{module} (no weight of the base model belongs to it)")
    for module, site in mapped.items():
        _check_every_use(module, site, sites, unadaptable)
    if problems:
        unnamed = [site for site in sites if site.quantized and not site.module]
        hint = (
            f"; {len(unnamed)} quantized projections carry no module name (the quantizer dropped "
            "the exporter's metadata): give module_mapping, or serve the float model with --quantize, "
            "which keeps the names"
            if unnamed
            else ""
        )
        raise InvalidArgument(
            "cannot map these adapter modules to base weights: "
            + "; ".join(problems)
            + " (run `ortmux inspect` on the model to see its adaptable modules; "
            "module_mapping names weights explicitly" + hint + ")",
            field="target_modules",
        )
    return mapped


def _unique(sites) -> list[LoraSite]:
    return list({site.call_group: site for site in sites}.values())


def _check_every_use(
    module: str, site: LoraSite, sites: Sequence[LoraSite], unadaptable: Sequence[Unadaptable]
) -> None:
    """FailedPrecondition when a call of ``module`` reads its weight where no branch can."""
    blocked = [
        use
        for use in unadaptable
        if use.weight == site.weight and (use.group or use.weight) == site.call_group
    ]
    if not blocked:
        return
    use = blocked[0]
    calls = [s.node or f"#{s.node_index}" for s in sites if s.call_group == site.call_group]
    raise FailedPrecondition(
        f"cannot serve adapter module '{module}' exactly: its weight '{site.weight}' is also read "
        f"by {use.op_type} node '{use.node}', where no LoRA branch can take it ({use.reason}); "
        f"branches can take its other calls ({', '.join(calls[:4])}) but not this one, and a "
        "partially applied adapter would give wrong outputs",
        field="target_modules",
    )
