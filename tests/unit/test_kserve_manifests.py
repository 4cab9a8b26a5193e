"""The KServe samples: a ServingRuntime speaking grpc-v2 on its h2c port with gRPC probes, whose
arguments the worker's own settings loader accepts, and an InferenceService that selects it."""

from __future__ import annotations

from pathlib import Path

import yaml

from ortmux.worker.settings import Settings

SAMPLES = Path(__file__).resolve().parents[2] / "docs" / "kserve"


def load(name: str) -> dict:
    return yaml.safe_load((SAMPLES / name).read_text())


def test_the_serving_runtime_speaks_grpc_v2_on_its_h2c_port_with_grpc_probes() -> None:
    runtime = load("servingruntime.yaml")
    assert (runtime["apiVersion"], runtime["kind"]) == ("serving.kserve.io/v1alpha1", "ServingRuntime")
    assert runtime["spec"]["protocolVersions"] == ["grpc-v2"]
    assert [f["name"] for f in runtime["spec"]["supportedModelFormats"]] == ["onnx"]
    (container,) = runtime["spec"]["containers"]
    assert container["name"] == "kserve-container"
    (port,) = container["ports"]
    assert port["name"] == "h2c"  # what KServe routes gRPC to
    settings = Settings.load([arg.replace("{{.Name}}", "ranker") for arg in container["args"]], environ={})
    assert settings.port == port["containerPort"]
    assert settings.model_paths() == {"ranker": Path("/mnt/models/model.onnx")}
    for probe in ("startupProbe", "readinessProbe"):
        assert container[probe]["grpc"]["port"] == port["containerPort"]
    assert container["livenessProbe"]["tcpSocket"]["port"] == port["containerPort"]
    assert runtime["spec"]["annotations"]["prometheus.kserve.io/port"] == str(settings.metrics_port)


def test_the_inference_service_selects_the_runtime_over_grpc_v2() -> None:
    service = load("inferenceservice.yaml")
    assert (service["apiVersion"], service["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    model = service["spec"]["predictor"]["model"]
    assert model["runtime"] == load("servingruntime.yaml")["metadata"]["name"]
    assert model["protocolVersion"] == "grpc-v2"
    assert model["modelFormat"]["name"] == "onnx"
