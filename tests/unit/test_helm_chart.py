"""The Helm chart: linted and rendered by Helm's own engine, every object checked against the
Kubernetes JSON schemas, and its config read back by the worker's settings loader."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from ortmux.worker.settings import Settings

CHART = Path(__file__).resolve().parents[2] / "helm" / "ortmux"
MANAGED = {"host", "port", "metrics_port", "http_port", "data_dir"}  # set by the chart, not by values.config
KUBERNETES = "1.30.0"
GPU_VALUES = {
    "gpu": {"enabled": True, "count": 2},
    "config": {
        "providers": ["CUDAExecutionProvider", "CPUExecutionProvider"],
        "drain_grace_seconds": 45,
        "adapter_store": "s3://ml-adapters/serving",
    },
    "autoscaling": {"enabled": True, "targetQueueDepth": 8},
    "serviceMonitor": {"enabled": True, "labels": {"release": "prom"}},
    "persistence": {"enabled": True, "existingClaim": "shared-models"},
    "nodeSelector": {"nvidia.com/gpu.present": "true"},
    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
}


def render(values: dict[str, Any] | None = None) -> dict[str, dict]:
    """Rendered objects by kind, with the name for the kinds rendered more than once (Service)."""
    with helm.Chart.load(str(CHART)) as chart:
        chart.validate_schema(values or {})
        manifests = chart.render(values or {}, name="rel", namespace="serving")
    objects = {}
    for path, text in manifests.items():
        if not path.endswith(".yaml"):
            continue
        for document in yaml.safe_load_all(text):
            if document:
                key = document["kind"]
                if key == "Service":
                    key = f"Service/{document['metadata']['name']}"
                assert key not in objects, key
                objects[key] = document
    return objects


def test_chart_lints_clean() -> None:
    report = helm.lint(str(CHART), strict=True, kube_version=f"v{KUBERNETES}")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not report["errors"] and not problems, report


TLS_VALUES = {
    "config": {
        "tls_cert_file": "/tls/tls.crt",
        "tls_key_file": "/tls/tls.key",
        "api_keys_file": "/keys/keys.toml",
    },
    "extraVolumes": [{"name": "tls", "secret": {"secretName": "ortmux-tls"}}],
    "extraVolumeMounts": [{"name": "tls", "mountPath": "/tls", "readOnly": True}],
}


SCALED_VALUES = {
    "replicaCount": 3,
    "persistence": {"enabled": False},
    "config": {"adapter_store": "s3://ml-adapters/serving", "adapter_disk_bytes": 4 << 30},
    "adapterStore": {
        "endpoint": "http://minio.storage:9000",
        "region": "eu-west-1",
        "credentialsSecret": "s3",
    },
    "adapterCache": {"type": "ephemeral", "size": "8Gi", "storageClass": "fast"},
    "serviceAccount": {
        "create": True,
        "annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/r"},
    },
}


@pytest.mark.parametrize(
    "values", [{}, GPU_VALUES, TLS_VALUES, SCALED_VALUES], ids=["default", "gpu", "tls", "scaled"]
)
def test_every_rendered_object_validates_against_the_kubernetes_schemas(values: dict) -> None:
    objects = render(values)
    for key, document in objects.items():
        if key == "ServiceMonitor":  # a CRD: no schema ships with Kubernetes
            assert document["apiVersion"] == "monitoring.coreos.com/v1"
            assert document["spec"]["endpoints"][0]["port"] == "metrics"
            continue
        kubernetes_validate.validate(document, KUBERNETES, strict=True)
    expected = {
        "ConfigMap",
        "Deployment",
        "Service/rel-ortmux",
        "Service/rel-ortmux-headless",
        "PodDisruptionBudget",
    }
    assert expected <= set(objects)
    probe = objects["Deployment"]["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
    assert ("tcpSocket" if values is TLS_VALUES else "grpc") in probe
    if values is SCALED_VALUES:
        assert "ServiceAccount" in objects and "PersistentVolumeClaim" not in objects
    if values is GPU_VALUES:
        assert {"HorizontalPodAutoscaler", "ServiceMonitor"} <= set(objects)
        assert "PersistentVolumeClaim" not in objects
    elif not values:
        assert "PersistentVolumeClaim" in objects and "HorizontalPodAutoscaler" not in objects


def test_rendered_config_is_what_the_worker_loads(tmp_path: Path) -> None:
    values = {"config": {"max_queue_delay_ms": 2.5, "max_batch_size": 16, "models": ["m=/models/m.onnx"]}}
    config = tmp_path / "ortmux.toml"
    config.write_text(render(values)["ConfigMap"]["data"]["ortmux.toml"])
    settings = Settings.load([], environ={}, config_file=config)
    assert (settings.max_queue_delay_ms, settings.max_batch_size, settings.models) == (
        2.5,
        16,
        ["m=/models/m.onnx"],
    )
    assert (settings.port, settings.metrics_port, str(settings.data_dir), settings.host) == (
        50051,
        9095,
        "/data",
        "0.0.0.0",
    )
    assert settings.adapter_memory_bytes == 2147483648  # an integer, though values hold numbers as floats


def test_values_schema_knows_every_worker_setting_and_refuses_others() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert set(schema["properties"]["config"]["properties"]) == {f.name for f in Settings.fields()} - MANAGED
    with helm.Chart.load(str(CHART)) as chart:
        for bad in (
            {"config": {"max_batch_sise": 4}},
            {"config": {"port": 1}},
            {"config": {"max_batch_size": "x"}},
        ):
            with pytest.raises(Exception):  # noqa: B017 - the SDK's schema error type
                chart.validate_schema(bad)


def test_deployment_drains_within_its_grace_runs_unprivileged_and_probes_by_grpc() -> None:
    default = render()["Deployment"]["spec"]["template"]["spec"]
    gpu = render(GPU_VALUES)["Deployment"]["spec"]["template"]["spec"]
    assert default["terminationGracePeriodSeconds"] > 20 and gpu["terminationGracePeriodSeconds"] > 45
    container = default["containers"][0]
    assert default["securityContext"]["runAsNonRoot"] and default["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["startupProbe"]["grpc"]["port"] == container["readinessProbe"]["grpc"]["port"] == 50051
    assert "nvidia.com/gpu" not in container["resources"].get("limits", {})
    assert gpu["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert gpu["volumes"][1]["persistentVolumeClaim"]["claimName"] == "shared-models"


def test_chart_readme_describes_every_value() -> None:
    readme = (CHART / "README.md").read_text()

    def leaves(node: Any, prefix: str = "") -> list[str]:
        opaque = {"config.", "resources.", "podSecurityContext.", "securityContext."}  # passed through whole
        if isinstance(node, dict) and node and prefix not in opaque:
            return [leaf for key, value in node.items() for leaf in leaves(value, f"{prefix}{key}.")]
        return [prefix.rstrip(".")]

    values = yaml.safe_load((CHART / "values.yaml").read_text())
    missing = [leaf for leaf in leaves(values) if f"`{leaf}`" not in readme]
    assert not missing, missing
    assert re.search(r"helm install", readme)


def test_dockerfile_runs_unprivileged_with_the_data_dir_as_a_volume() -> None:
    root = CHART.parents[1]
    dockerfile = (root / "Dockerfile").read_text()
    user = re.search(r"^USER (\d+)", dockerfile, re.M)
    assert user and int(user.group(1)) != 0
    assert "ARG BASE_IMAGE=" in dockerfile and 'VOLUME ["/data"]' in dockerfile
    assert 'ENTRYPOINT ["ortmux", "serve"]' in dockerfile
    for source in re.findall(r"^COPY (\S+)", dockerfile, re.M):
        assert (root / source).exists(), source


@pytest.mark.parametrize(
    "values",
    [{"replicaCount": 2}, {"autoscaling": {"enabled": True, "maxReplicas": 3}}],
    ids=["replicas", "autoscaling"],
)
def test_several_pods_without_a_shared_store_are_refused_at_render_time(values: dict) -> None:
    with pytest.raises(Exception, match=r"needs a shared adapter store: set config\.adapter_store"):
        render(values)
    render({**values, "config": {"adapter_store": "s3://b/p"}})  # with a store it renders


def test_a_shared_store_reaches_the_pod_as_aws_environment_and_a_per_pod_cache() -> None:
    objects = render(SCALED_VALUES)
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {item["name"]: item.get("value") for item in container["env"]}
    assert env["AWS_ENDPOINT_URL"] == "http://minio.storage:9000" and env["AWS_REGION"] == "eu-west-1"
    assert container["envFrom"] == [{"secretRef": {"name": "s3"}}]
    assert {"name": "adapter-cache", "mountPath": "/data/adapters"} in container["volumeMounts"]
    cache = next(volume for volume in pod["volumes"] if volume["name"] == "adapter-cache")
    claim = cache["ephemeral"]["volumeClaimTemplate"]["spec"]
    assert claim["resources"]["requests"]["storage"] == "8Gi" and claim["storageClassName"] == "fast"
    assert objects["Deployment"]["spec"]["replicas"] == 3
    assert pod["serviceAccountName"] == "rel-ortmux"
    assert (
        objects["ServiceAccount"]["metadata"]["annotations"] == SCALED_VALUES["serviceAccount"]["annotations"]
    )
    config = objects["ConfigMap"]["data"]["ortmux.toml"]
    assert (
        'adapter_store = "s3://ml-adapters/serving"' in config and "adapter_disk_bytes = 4294967296" in config
    )
    empty = render({**SCALED_VALUES, "adapterCache": {"type": "emptyDir", "size": "2Gi"}})
    cache = next(
        v for v in empty["Deployment"]["spec"]["template"]["spec"]["volumes"] if v["name"] == "adapter-cache"
    )
    assert cache == {"name": "adapter-cache", "emptyDir": {"sizeLimit": "2Gi"}}


def test_the_http_api_is_exposed_when_enabled_and_probes_stay_on_grpc() -> None:
    off = render({})
    on = render({"http": {"enabled": True}})
    assert "http_port = -1" in off["ConfigMap"]["data"]["ortmux.toml"]
    assert "http_port = 8000" in on["ConfigMap"]["data"]["ortmux.toml"]
    assert [p["name"] for p in off["Service/rel-ortmux"]["spec"]["ports"]] == ["grpc", "metrics"]
    assert {
        "name": "http",
        "port": 8000,
        "targetPort": "http",
        "protocol": "TCP",
        "appProtocol": "http",
    } in on["Service/rel-ortmux"]["spec"]["ports"]
    container = on["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "http", "containerPort": 8000, "protocol": "TCP"} in container["ports"]
    before = off["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"] == before["readinessProbe"]
    assert container["livenessProbe"] == before["livenessProbe"]
