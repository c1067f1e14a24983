"""The Helm chart through the real Helm SDK (helm-python-sdk): lint, render, schemas, shipped files."""

from __future__ import annotations

import json
import re

import cloudcoil.models.prometheus_operator.v1 as operator
import helm_python as helm
import kubernetes_validate
import pytest
import yaml
from conftest import ROOT

CHART = ROOT / "helm" / "gpu-residency"
KUBERNETES_VERSION = kubernetes_validate.latest_version()
EVERYTHING_ON = {
    "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
    "prometheusRule": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
    "dashboards": {"enabled": True, "folder": "GPU"},
    "runtimeClassName": "nvidia",
    "priorityClassName": "system-node-critical",
    "imagePullSecrets": [{"name": "regcred"}],
    "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "nvidia.com/gpu.count", "operator": "Exists"}]}]}}},
    "exporter": {"engineDiscovery": False, "sglangAllowedHosts": ["10.0.0.0/8"], "extraArgs": ["--log.level=debug"]},
    "podAnnotations": {"a": "b"},
    "service": {"annotations": {"x": "y"}},
}  # fmt: skip


def render(values: dict | None = None) -> dict[str, list[dict]]:
    """Rendered objects by kind (NOTES.txt left out)."""
    chart = helm.Chart.load(CHART)
    manifests = chart.render(values or {}, name="gpu", namespace="monitoring")
    objects: dict[str, list[dict]] = {}
    for path, text in manifests.items():
        if path.endswith("NOTES.txt"):
            continue
        for document in yaml.safe_load_all(text):
            if document:
                objects.setdefault(document["kind"], []).append(document)
    return objects


def test_lint_has_no_errors_or_warnings():
    for values in ({}, EVERYTHING_ON):
        report = helm.lint(str(CHART), values, strict=True)
        problems = [m for m in report["messages"] if m["severity"] >= 2]
        assert not report["errors"] and not problems, report


def test_defaults_render_a_hardened_daemonset_without_operator_objects():
    objects = render()
    assert set(objects) == {"DaemonSet", "Service", "ServiceAccount", "ConfigMap"}
    (daemonset,) = objects["DaemonSet"]
    pod = daemonset["spec"]["template"]["spec"]
    assert pod["hostPID"] is True
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    (container,) = pod["containers"]
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] and not security["allowPrivilegeEscalation"]
    assert security["capabilities"]["drop"] == ["ALL"] and security["privileged"] is False
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["NVIDIA_VISIBLE_DEVICES"] == "all" and env["NVIDIA_DRIVER_CAPABILITIES"] == "utility"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["resources"]["limits"]["memory"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert volumes["registry"]["hostPath"] == {"path": "/run/gpu-residency/engines", "type": "DirectoryOrCreate"}
    assert mounts["registry"] == {"name": "registry", "mountPath": "/run/gpu-residency/engines", "readOnly": True}
    assert "--registry.dir=/run/gpu-residency/engines" in container["args"]
    # The exporter's own state: the one host directory it writes, next to a read-only root filesystem.
    assert volumes["state"]["hostPath"] == {"path": "/var/lib/gpu-residency", "type": "DirectoryOrCreate"}
    assert mounts["state"] == {"name": "state", "mountPath": "/var/lib/gpu-residency"}
    assert "--state.dir=/var/lib/gpu-residency" in container["args"]
    writable = [m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")]
    assert sorted(writable) == ["/tmp", "/var/lib/gpu-residency"]


def test_values_explain_why_host_pid():
    values_text = (CHART / "values.yaml").read_text()
    comment = values_text.split("hostPID: true")[0].rsplit("\n\n", 1)[1]
    assert "NVML reports host PIDs" in comment


@pytest.mark.parametrize("values", [{}, EVERYTHING_ON], ids=["defaults", "everything-on"])
def test_every_rendered_object_is_valid_for_kubernetes(values):
    objects = render(values)
    for kind, documents in objects.items():
        for document in documents:
            if kind in ("ServiceMonitor", "PrometheusRule"):
                getattr(operator, kind).model_validate(document)
            else:
                kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def test_schema_validation_catches_a_wrong_value_rejected_by_kubernetes_too():
    chart = helm.Chart.load(CHART)
    with pytest.raises(helm.HelmError, match="port"):
        chart.validate_schema({"exporter": {"port": "ninety"}})
    with pytest.raises(helm.HelmError):
        chart.validate_schema({"hostPid": True})  # a typo is refused, not silently ignored


def test_everything_on_renders_operator_objects_and_options():
    objects = render(EVERYTHING_ON)
    (monitor,) = objects["ServiceMonitor"]
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    (daemonset,) = objects["DaemonSet"]
    pod = daemonset["spec"]["template"]["spec"]
    assert pod["runtimeClassName"] == "nvidia" and pod["priorityClassName"] == "system-node-critical"
    args = pod["containers"][0]["args"]
    assert "--no-engines.discover" in args and "--sglang.allowed-hosts=10.0.0.0/8" in args


def test_prometheus_rule_is_the_promtool_tested_file():
    (rule,) = render(EVERYTHING_ON)["PrometheusRule"]
    shipped = yaml.safe_load((ROOT / "dashboards" / "alerts.yaml").read_text())
    assert rule["spec"] == shipped
    assert "{{ $labels.node }}" in json.dumps(rule), "the alerts' own templates stay literal"


def test_dashboards_configmap_is_dashboards_dir():
    (configmap,) = render()["ConfigMap"]
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = {p.name: p.read_text() for p in (ROOT / "dashboards").glob("*.json")}
    assert configmap["data"] == shipped


def test_notes_warn_without_host_pid():
    chart = helm.Chart.load(CHART)
    notes = chart.render({"hostPID": False}, name="gpu", namespace="monitoring")["gpu-residency/templates/NOTES.txt"]
    assert "WARNING: hostPID is off" in notes
    assert re.search(r"port-forward ds/gpu-gpu-residency 9852", notes)


def test_dockerfile_runs_the_exporter():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["gpu-residency-exporter"]' in dockerfile and "COPY exporter" in dockerfile
