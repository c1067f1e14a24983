{{/* Chart name, truncated to the 63 characters a label value allows. */}}
{{- define "gpu-residency.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "gpu-residency.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "gpu-residency.selectorLabels" -}}
app.kubernetes.io/name: {{ include "gpu-residency.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "gpu-residency.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "gpu-residency.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "gpu-residency.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{- define "gpu-residency.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "gpu-residency.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* --engines.allowed-hosts: the node's IP (expanded by the kubelet from HOST_IP), then the user's
     list, then the deprecated exporter.sglangAllowedHosts. */}}
{{- define "gpu-residency.engineAllowedHosts" -}}
{{- concat (list "$(HOST_IP)") .Values.exporter.engineAllowedHosts .Values.exporter.sglangAllowedHosts | uniq | join "," }}
{{- end }}

{{/* Non-empty when the exporter serves with a web config (web.existingSecret): TLS, basic auth or both. */}}
{{- define "gpu-residency.webConfig" -}}
{{- if or .Values.web.tls.enabled .Values.web.basicAuth.enabled }}true{{ end }}
{{- end }}

{{/* Liveness and readiness: /healthz needs no credentials, over HTTPS when TLS is on. With client
     certificates required the kubelet (which has none) cannot finish a handshake: a TCP probe. */}}
{{- define "gpu-residency.probe" -}}
{{- if .Values.web.tls.requireClientCert -}}
tcpSocket:
  port: metrics
{{- else -}}
httpGet:
  path: /healthz
  port: metrics
  scheme: {{ .Values.web.tls.enabled | ternary "HTTPS" "HTTP" }}
{{- end }}
{{- end }}

{{/* The name the exporter's certificate must carry: serviceMonitor.tlsConfig.serverName, else the Service's DNS name. */}}
{{- define "gpu-residency.serverName" -}}
{{- .Values.serviceMonitor.tlsConfig.serverName | default (printf "%s.%s.svc" (include "gpu-residency.fullname" .) .Release.Namespace) }}
{{- end }}
