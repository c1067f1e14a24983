"""The Helm chart through the real Helm SDK (helm-python-sdk): lint, render, schemas, shipped files."""

from __future__ import annotations

import http.client
import json
import re
import shutil
import ssl
import subprocess
import tempfile
from pathlib import Path

import bcrypt
import cloudcoil.models.prometheus_operator.v1 as operator
import helm_python as helm
import kubernetes_validate
import pytest
import urllib3
import yaml
from conftest import ROOT, as_deployed, in_container, python_for_others, require_tool

CHART = ROOT / "helm" / "gpu-residency"
KUBERNETES_VERSION = kubernetes_validate.latest_version()


def merged(*layers: dict) -> dict:
    """Values layered as Helm layers -f files: maps merge key by key, null removes a key, anything else replaces."""
    out: dict = {}
    for layer in layers:
        for key, value in layer.items():
            if value is None:
                out.pop(key, None)
            elif isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = merged(out[key], value)
            else:
                out[key] = value
    return out


WEB_SECRET = "gpu-residency-web"
TLS = {
    "web": {"existingSecret": WEB_SECRET, "tls": {"enabled": True}},
    "serviceMonitor": {"enabled": True, "tlsConfig": {"ca": {"secret": {"name": WEB_SECRET, "key": "tls.crt"}}}},
}
BASIC_AUTH = {
    "web": {"existingSecret": WEB_SECRET, "basicAuth": {"enabled": True}},
    "serviceMonitor": {"enabled": True, "basicAuth": {"existingSecret": "gpu-residency-scrape"}},
}
CA_MAP = {"name": "cluster-ca", "key": "ca.crt"}
CLIENT_CERT = {
    "cert": {"secret": {"name": "client", "key": "tls.crt"}},
    "keySecret": {"name": "client", "key": "tls.key"},
}
MUTUAL_TLS = merged(TLS, {
    "web": {"tls": {"requireClientCert": True}},
    "serviceMonitor": {"tlsConfig": {"serverName": "exporter.example", **CLIENT_CERT}},
})  # fmt: skip
EVERYTHING_ON = merged(TLS, BASIC_AUTH, {
    "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
    "prometheusRule": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
    "dashboards": {"enabled": True, "folder": "GPU"},
    "runtimeClassName": "nvidia",
    "priorityClassName": "system-node-critical",
    "imagePullSecrets": [{"name": "regcred"}],
    "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "nvidia.com/gpu.count", "operator": "Exists"}]}]}}},
    "exporter": {"engineDiscovery": False, "engineAllowedHosts": ["10.0.0.0/8"], "extraArgs": ["--log.level=debug"]},
    "hostNetwork": True,
    "registry": {"mode": "1777"},
    "podAnnotations": {"a": "b"},
    "service": {"annotations": {"x": "y"}},
})  # fmt: skip


def exporter_container(objects: dict[str, list[dict]]) -> dict:
    (daemonset,) = objects["DaemonSet"]
    (container,) = daemonset["spec"]["template"]["spec"]["containers"]
    return container


def kubelet_args(container: dict, field_values: dict[str, str]) -> list[str]:
    """The container's args as the kubelet passes them: $(VAR) expanded from the container's env,
    whose fieldRefs take their value from `field_values` (the downward API)."""
    env = {e["name"]: e.get("value", field_values.get(e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")))
           for e in container["env"]}  # fmt: skip
    return [re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env[m.group(1)], arg) for arg in container["args"]]


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
    assert not [a for a in container["args"] if a.startswith("--web.config.file")] and "web" not in volumes
    assert container["livenessProbe"]["httpGet"]["scheme"] == "HTTP"


def test_values_explain_why_host_pid():
    values_text = (CHART / "values.yaml").read_text()
    comment = values_text.split("hostPID: true")[0].rsplit("\n\n", 1)[1]
    assert "NVML reports host PIDs" in comment


@pytest.mark.parametrize(
    "values",
    [{}, EVERYTHING_ON, TLS, BASIC_AUTH, MUTUAL_TLS],
    ids=["defaults", "everything-on", "tls", "basic-auth", "mutual-tls"],
)
def test_every_rendered_object_is_valid_for_kubernetes(values):
    objects = render(values)
    for kind, documents in objects.items():
        for document in documents:
            if kind in ("ServiceMonitor", "PrometheusRule"):
                model = getattr(operator, kind).model_validate(document)
                # The models ignore fields they do not know: a misspelt one must not pass.
                assert model.model_dump(by_alias=True, exclude_unset=True, mode="json") == document
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
    assert "--no-engines.discover" in args and "--engines.allowed-hosts=$(HOST_IP),10.0.0.0/8" in args


# The labels prometheus-operator gives every target of a ServiceMonitor (its promcfg.go:
# namespace, service, pod, container, endpoint, job; Prometheus adds instance; `node` only for
# Node endpoints). Without honorLabels a series label of the same name is renamed exported_<name>.
OPERATOR_TARGET_LABELS = {"namespace", "service", "pod", "container", "endpoint", "job", "instance"}


def test_no_series_label_collides_with_the_service_monitors_target_labels(local_exporter, scenario, spawn_tree):
    tree = spawn_tree()
    scenario.gpus[0].processes = [(tree.leaves[0], 1024**3)]
    scenario.write()
    ours = {name for samples in local_exporter.scrape().values() for labels, _ in samples for name in labels}
    assert {"pod_uid", "holder_kind", "node"} <= ours, "the process series were scraped"
    objects = render(EVERYTHING_ON)
    (monitor,) = objects["ServiceMonitor"]
    (service,) = objects["Service"]
    assert service["spec"]["selector"], "endpoints are pods: the operator sets no node label"
    spec = monitor["spec"]
    targets = {*OPERATOR_TARGET_LABELS, *spec.get("targetLabels", ()), *spec.get("podTargetLabels", ())}
    for endpoint in spec["endpoints"]:
        assert not endpoint.get("honorLabels"), "the target's labels win, so ours must not share their names"
        relabeled = endpoint.get("relabelings", []) + endpoint.get("metricRelabelings", [])
        targets |= {rule.get("targetLabel") for rule in relabeled} - {None}
    assert not ours & targets, f"renamed exported_*: {sorted(ours & targets)}"


def test_prometheus_rule_is_the_promtool_tested_file():
    (rule,) = render(EVERYTHING_ON)["PrometheusRule"]
    recording, alerts = (
        yaml.safe_load((ROOT / "dashboards" / name).read_text()) for name in ("rules.yaml", "alerts.yaml")
    )
    assert rule["spec"] == {"groups": recording["groups"] + alerts["groups"]}
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


def test_notes_tell_frameworks_about_pod_ip_and_the_deprecated_name():
    chart = helm.Chart.load(CHART)
    notes = chart.render({}, name="gpu", namespace="monitoring")["gpu-residency/templates/NOTES.txt"]
    assert "POD_IP from the downward API (status.podIP)" in notes
    assert "pod CIDR in exporter.engineAllowedHosts" in notes and "DEPRECATED" not in notes
    values = {"exporter": {"sglangAllowedHosts": [POD_CIDR]}, "hostNetwork": True}
    notes = chart.render(values, name="gpu", namespace="monitoring")["gpu-residency/templates/NOTES.txt"]
    assert f"in hostNetwork pods), {POD_CIDR}." in notes and "port\n9852 is open on every node interface" in notes
    assert "DEPRECATED: exporter.sglangAllowedHosts is now exporter.engineAllowedHosts" in notes


def test_notes_show_how_to_reach_the_metrics_with_tls_and_basic_auth():
    chart = helm.Chart.load(CHART)
    notes = chart.render(merged(TLS, BASIC_AUTH), name="gpu", namespace="monitoring")
    notes = notes["gpu-residency/templates/NOTES.txt"]
    assert (
        "curl -s --cacert ca.crt -u prometheus:<password> --connect-to ::localhost:9852 "
        "https://gpu-gpu-residency.monitoring.svc:9852/metrics" in notes
    )
    assert f"web-config.yml of Secret {WEB_SECRET}\n(TLS on, basic auth on)" in notes


def test_dockerfile_runs_the_exporter():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["gpu-residency-exporter"]' in dockerfile and "COPY exporter" in dockerfile


NODE_IP = "203.0.113.7"  # TEST-NET-3: not an address of the machine running the tests
POD_CIDR = "198.51.100.0/24"


@pytest.mark.parametrize(
    "exporter_values, flag",
    [
        ({}, "--engines.allowed-hosts=$(HOST_IP)"),
        ({"engineAllowedHosts": [POD_CIDR]}, f"--engines.allowed-hosts=$(HOST_IP),{POD_CIDR}"),
        ({"sglangAllowedHosts": [POD_CIDR]}, f"--engines.allowed-hosts=$(HOST_IP),{POD_CIDR}"),
    ],
    ids=["defaults", "pod-cidr", "deprecated-name"],
)
def test_engines_on_the_node_ip_are_allowed_by_default_and_the_pod_network_on_request(exporter_values, flag):
    from exporter.cli import build_parser
    from exporter.pollers.url_policy import UrlPolicy

    container = exporter_container(render({"exporter": exporter_values}))
    host_ip = next(e for e in container["env"] if e["name"] == "HOST_IP")
    assert host_ip["valueFrom"] == {"fieldRef": {"fieldPath": "status.hostIP"}}
    assert [a for a in container["args"] if a.startswith("--engines.allowed-hosts")] == [flag]
    pod_network_allowed = POD_CIDR in flag
    # The exporter's own parser and URL policy, on the args as the kubelet expands them.
    args = build_parser().parse_args(kubelet_args(container, {"status.hostIP": NODE_IP, "spec.nodeName": "n1"}))
    policy = UrlPolicy.default([h for h in args.engines_allowed.split(",") if h])
    assert policy.check(f"http://{NODE_IP}:30000") is None, "an engine in a hostNetwork pod (POD_IP = node IP)"
    assert (policy.check("http://198.51.100.23:30000") is None) is pod_network_allowed, "an engine in a pod"
    assert policy.check("http://192.0.2.200:30000") is not None, "anything else stays refused"


@pytest.mark.parametrize("host_network", [False, True])
def test_host_network_is_opt_in_and_keeps_cluster_dns(host_network):
    (daemonset,) = render({"hostNetwork": host_network})["DaemonSet"]
    pod = daemonset["spec"]["template"]["spec"]
    assert pod.get("hostNetwork", False) is host_network
    assert pod.get("dnsPolicy") == ("ClusterFirstWithHostNet" if host_network else None)


def test_allowed_hosts_are_single_items():
    chart = helm.Chart.load(CHART)
    for bad in (["10.0.0.0/8,10.1.0.0/16"], ["10.0.0.0/8 "], [""]):
        with pytest.raises(helm.HelmValuesError, match="engineAllowedHosts"):
            chart.validate_schema({"exporter": {"engineAllowedHosts": bad}})


@pytest.mark.parametrize("values", [TLS, BASIC_AUTH, merged(TLS, BASIC_AUTH)], ids=["tls", "basic-auth", "both"])
def test_web_config_comes_read_only_from_the_secret_and_sets_probes_and_service_monitor(values):
    tls, basic_auth = ("tls" in values["web"]), ("basicAuth" in values["web"])
    objects = render(values)
    container = exporter_container(objects)
    pod = objects["DaemonSet"][0]["spec"]["template"]["spec"]
    assert "--web.config.file=/etc/gpu-residency/web/web-config.yml" in container["args"]
    assert {"name": "web", "mountPath": "/etc/gpu-residency/web", "readOnly": True} in container["volumeMounts"]
    assert {"name": "web", "secret": {"secretName": WEB_SECRET, "defaultMode": 0o400}} in pod["volumes"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    for probe in (container["livenessProbe"], container["readinessProbe"]):
        assert probe["httpGet"] == {"path": "/healthz", "port": "metrics", "scheme": "HTTPS" if tls else "HTTP"}

    ((endpoint,),) = [monitor["spec"]["endpoints"] for monitor in objects["ServiceMonitor"]]
    assert endpoint.get("scheme", "http") == ("https" if tls else "http")
    if tls:
        assert endpoint["tlsConfig"] == {
            "serverName": "gpu-gpu-residency.monitoring.svc",  # the Service's DNS name
            "insecureSkipVerify": False,
            "ca": {"secret": {"name": WEB_SECRET, "key": "tls.crt"}},
        }
    else:
        assert "tlsConfig" not in endpoint
    if basic_auth:
        assert endpoint["basicAuth"] == {
            "username": {"name": "gpu-residency-scrape", "key": "username"},
            "password": {"name": "gpu-residency-scrape", "key": "password"},
        }
    else:
        assert "basicAuth" not in endpoint


def test_required_client_certificates_make_the_probes_tcp_and_prometheus_present_one():
    objects = render(MUTUAL_TLS)
    container = exporter_container(objects)
    for probe in (container["livenessProbe"], container["readinessProbe"]):
        assert probe["tcpSocket"] == {"port": "metrics"} and "httpGet" not in probe  # the kubelet has no certificate
    ((endpoint,),) = [monitor["spec"]["endpoints"] for monitor in objects["ServiceMonitor"]]
    assert endpoint["scheme"] == "https" and endpoint["tlsConfig"]["serverName"] == "exporter.example"
    assert endpoint["tlsConfig"]["cert"] == {"secret": {"name": "client", "key": "tls.crt"}}
    assert endpoint["tlsConfig"]["keySecret"] == {"name": "client", "key": "tls.key"}


@pytest.mark.parametrize(
    "values, message",
    [
        ({"web": {"tls": {"enabled": True}}}, "at '/web/existingSecret': minLength"),
        ({"web": {"basicAuth": {"enabled": True}}}, "at '/web/existingSecret': minLength"),
        ({"web": {"existingSecret": WEB_SECRET}}, "at '/web/tls/enabled': value must be true"),
        (merged(BASIC_AUTH, {"web": {"tls": {"requireClientCert": True}}}), "at '/web/tls/enabled'"),
        (merged(TLS, {"serviceMonitor": {"tlsConfig": {"ca": None}}}), "missing property 'ca'"),
        (merged(TLS, {"serviceMonitor": {"tlsConfig": {"ca": {"secret": {"name": None}}}}}), "property 'name'"),
        (merged(TLS, {"serviceMonitor": {"tlsConfig": {"ca": {"secret": None, "configMap": CA_MAP}}}}), None),
        (merged(TLS, {"serviceMonitor": {"tlsConfig": {"ca": None, "insecureSkipVerify": True}}}), None),
        (merged(MUTUAL_TLS, {"serviceMonitor": {"tlsConfig": {"keySecret": None}}}), "missing property 'keySecret'"),
        (merged(BASIC_AUTH, {"serviceMonitor": {"basicAuth": None}}), "/serviceMonitor/basicAuth/existingSecret"),
        (merged(TLS, {"web": {"tls": {"verify": True}}}), "additional properties 'verify' not allowed"),
        (merged(TLS, {"web": {"tls": {"enabled": "yes"}}}), "at '/web/tls/enabled'"),
        (merged(TLS, {"serviceMonitor": {"tlsConfig": {"caFile": "/etc/ca.crt"}}}), "additional properties 'caFile'"),
    ],
)  # fmt: skip
def test_schema_allows_exactly_the_web_settings_and_requires_what_they_need(values, message):
    chart = helm.Chart.load(CHART)
    errors = helm.lint(str(CHART), values, strict=True)["errors"]
    if message is None:
        chart.validate_schema(values)
        render(values)
        assert errors == []
        return
    with pytest.raises(helm.HelmValuesError, match=re.escape(message)):
        chart.validate_schema(values)
    with pytest.raises(helm.HelmValuesError, match=re.escape(message)):
        render(values)
    assert any(message in error for error in errors), errors


def documented(marker: str) -> str:
    """The fenced block of docs/SECURITY.md whose first line is `marker`."""
    blocks = re.findall(r"```[a-z]*\n(.*?)```", (ROOT / "docs" / "SECURITY.md").read_text(), re.S)
    (block,) = [b for b in blocks if b.startswith(marker + "\n")]
    return block


def test_the_documented_web_config_serves_the_scrape_the_service_monitor_describes(
    exporter_factory, scenario, tmp_path
):
    openssl = require_tool("openssl")
    objects = render(yaml.safe_load(documented("# values.yaml")))
    container = exporter_container(objects)
    ((endpoint,),) = [monitor["spec"]["endpoints"] for monitor in objects["ServiceMonitor"]]
    mount = next(m for m in container["volumeMounts"] if m["name"] == "web")
    (volume,) = [v for v in objects["DaemonSet"][0]["spec"]["template"]["spec"]["volumes"] if v["name"] == "web"]

    # The Secrets the docs create, mounted as the kubelet mounts a Secret: one file per key, the volume's mode.
    mounted = tmp_path / "web"
    mounted.mkdir()
    server_name = endpoint["tlsConfig"]["serverName"]
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=gpu-residency",
         "-addext", f"subjectAltName=DNS:{server_name}",
         "-keyout", str(mounted / "tls.key"), "-out", str(mounted / "tls.crt")],
        check=True, capture_output=True,
    )  # fmt: skip
    hashed = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(rounds=4)).decode()
    web_config = documented("# web-config.yml").replace("$2b$12$...", f"'{hashed}'")
    (mounted / "web-config.yml").write_text(web_config.replace(mount["mountPath"], str(mounted)))
    for path in mounted.iterdir():
        path.chmod(volume["secret"]["defaultMode"])
    secrets = {
        volume["secret"]["secretName"]: {path.name: path.read_text() for path in mounted.iterdir()},
        endpoint["basicAuth"]["username"]["name"]: {"username": "prometheus", "password": "s3cret"},
    }

    # The exporter with the chart's web config flag, as the chart runs it: no capabilities, read-only root.
    flags = [a.replace(mount["mountPath"], str(mounted)) for a in container["args"] if a.startswith("--web.config")]
    state = tmp_path / "state"
    state.mkdir()
    exporter = exporter_factory(scenario, *flags, "--state.dir", str(state), wrapper=as_deployed(writable=[state]))
    port = int(exporter.url.rsplit(":", 1)[1])

    # Prometheus as the ServiceMonitor tells it: https, the CA from the Secret, serverName, basic auth.
    def key(ref: dict) -> str:
        return secrets[ref["name"]][ref["key"]]

    tls = endpoint["tlsConfig"]
    assert endpoint["scheme"] == "https" and tls["insecureSkipVerify"] is False

    def prometheus(name: str) -> urllib3.HTTPSConnectionPool:
        context = ssl.create_default_context(cadata=key(tls["ca"]["secret"]))
        return urllib3.HTTPSConnectionPool(
            "127.0.0.1", port, ssl_context=context, server_hostname=name, assert_hostname=name, retries=False
        )

    credentials = f"{key(endpoint['basicAuth']['username'])}:{key(endpoint['basicAuth']['password'])}"
    scrape = prometheus(tls["serverName"]).request(
        "GET", endpoint["path"], headers=urllib3.make_headers(basic_auth=credentials)
    )
    assert scrape.status == 200 and b"gpu_residency_memory_used_bytes" in scrape.data
    assert prometheus(tls["serverName"]).request("GET", endpoint["path"]).status == 401
    with pytest.raises(urllib3.exceptions.SSLError):  # the certificate is checked against serverName
        prometheus("elsewhere.monitoring.svc").request("GET", endpoint["path"])

    # The kubelet's probes: HTTPS without checking the certificate, and without credentials.
    for probe in (container["livenessProbe"]["httpGet"], container["readinessProbe"]["httpGet"]):
        assert probe["scheme"] == "HTTPS"
        kubelet = http.client.HTTPSConnection("127.0.0.1", port, context=ssl._create_unverified_context(), timeout=10)
        kubelet.request("GET", probe["path"])
        assert kubelet.getresponse().status == 200
        kubelet.close()


def test_registry_mode_is_set_by_a_capability_less_init_container_so_other_users_can_register(env_for_others):
    objects = render({"registry": {"mode": "1777"}})
    pod = objects["DaemonSet"][0]["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    assert init["image"] == exporter_container(objects)["image"]
    assert (
        init["securityContext"]["capabilities"]["drop"] == ["ALL"] and init["securityContext"]["readOnlyRootFilesystem"]
    )
    assert init["volumeMounts"] == [{"name": "registry", "mountPath": "/run/gpu-residency/engines"}]
    assert {"name": "registry", "mountPath": "/run/gpu-residency/engines", "readOnly": True} in (
        exporter_container(objects)["volumeMounts"]
    ), "the exporter itself still only reads it"
    assert "initContainers" not in render()["DaemonSet"][0]["spec"]["template"]["spec"]
    notes = helm.Chart.load(CHART).render({}, name="gpu", namespace="monitoring")["gpu-residency/templates/NOTES.txt"]
    assert "frameworks running as non-root users need\nregistry.mode=1777" in notes

    # The command, run as the chart runs it (root without capabilities) on a directory the kubelet
    # made (root, 0755): afterwards a framework running as uid 1000 registers an engine there.
    base = Path(tempfile.mkdtemp(prefix="gpu-residency-chart-"))
    try:
        base.chmod(0o755)
        registry = base / "engines"
        registry.mkdir(mode=0o755)
        mount = init["volumeMounts"][0]["mountPath"]
        command = [arg.replace(mount, str(registry)) for arg in init["command"]]
        subprocess.run([*as_deployed(writable=[registry]), *command], check=True, capture_output=True, timeout=30)
        assert registry.stat().st_mode & 0o7777 == 0o1777
        register = "import sys; from exporter.registry import register_engine as r; r('e', 1, directory=sys.argv[1])"
        subprocess.run(
            [*in_container(uid=1000), python_for_others(), "-c", register, str(registry)],
            check=True, capture_output=True, timeout=30, env=env_for_others,
        )  # fmt: skip
        assert (registry / "e.json").stat().st_uid == 1000
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_registry_mode_is_an_octal_mode():
    chart = helm.Chart.load(CHART)
    for bad in ("777 ", "rwx", "99999", "u+w"):
        with pytest.raises(helm.HelmValuesError, match="/registry/mode"):
            chart.validate_schema({"registry": {"mode": bad}})


def test_notes_and_values_show_alert_routing_by_cluster_as_the_readme_does():
    """Many clusters share one Alertmanager (issue 27): the chart shows the README's route by cluster,
    the one tests/test_clusters.py delivers an alert through."""
    chart = helm.Chart.load(CHART)
    notes = chart.render({"prometheusRule": {"enabled": True}}, name="gpu", namespace="monitoring")[
        "gpu-residency/templates/NOTES.txt"
    ]
    blocks = re.findall(r"```yaml\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    route = yaml.safe_load(next(b for b in blocks if "alertmanager.yml" in b))["route"]
    values = (ROOT / "helm" / "gpu-residency" / "values.yaml").read_text()
    for text in (notes, values):
        assert f"group_by: [{', '.join(route['group_by'])}]" in text
        assert f"- matchers: ['{route['routes'][0]['matchers'][0]}']" in text
