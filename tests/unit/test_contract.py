"""Every RPC of the v1 contract has its own servicer method (none falls back to UNIMPLEMENTED)."""

from __future__ import annotations

from ortmux.v1 import adapters_pb2, inference_pb2, models_pb2
from ortmux.worker.api.servicers import AdapterServicer, InferenceServicer, ModelServicer

SERVICERS = {
    "ModelService": ModelServicer,
    "AdapterService": AdapterServicer,
    "InferenceService": InferenceServicer,
}


def test_every_rpc_of_the_contract_is_served() -> None:
    declared = {
        (service.name, method.name)
        for module in (models_pb2, adapters_pb2, inference_pb2)
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    }
    assert {service for service, _ in declared} == set(SERVICERS)
    missing = sorted(f"{s}.{m}" for s, m in declared if m not in vars(SERVICERS[s]))
    assert not missing, missing
