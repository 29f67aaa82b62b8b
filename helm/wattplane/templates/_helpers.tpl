{{- define "wattplane.name" -}}wattplane{{- end -}}

{{- define "wattplane.fullname" -}}
{{- if contains "wattplane" .Release.Name -}}{{ .Release.Name | trunc 50 | trimSuffix "-" }}
{{- else -}}{{ printf "%s-wattplane" .Release.Name | trunc 50 | trimSuffix "-" }}{{- end -}}
{{- end -}}

{{- define "wattplane.labels" -}}
app.kubernetes.io/name: wattplane
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "wattplane.selector" -}}
app.kubernetes.io/name: wattplane
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "wattplane.controllerImage" -}}
{{ .Values.image.controllerRepository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "wattplane.agentImage" -}}
{{ .Values.image.agentRepository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* Non-root, read-only root fs, no privilege escalation, no capabilities: for every container. */}}
{{- define "wattplane.containerSecurity" -}}
runAsNonRoot: true
runAsUser: {{ .Values.podSecurity.runAsUser }}
runAsGroup: {{ .Values.podSecurity.runAsUser }}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}
