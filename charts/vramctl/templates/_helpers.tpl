{{/* Chart name, overridable. */}}
{{- define "vramctl.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: the release name when it already contains the chart name. */}}
{{- define "vramctl.fullname" -}}
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

{{- define "vramctl.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels: never change them after a release exists. */}}
{{- define "vramctl.selectorLabels" -}}
app.kubernetes.io/name: {{ include "vramctl.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Standard labels on every object. */}}
{{- define "vramctl.labels" -}}
helm.sh/chart: {{ include "vramctl.chart" . }}
{{ include "vramctl.selectorLabels" . }}
app.kubernetes.io/component: operator
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: vramctl
{{- end }}

{{- define "vramctl.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "vramctl.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "vramctl.tokenSecretName" -}}
{{- default (printf "%s-api-token" (include "vramctl.fullname" .)) .Values.apiToken.existingSecret }}
{{- end }}

{{- define "vramctl.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The namespaces where the Pod runtime may run model Pods (a Role and a
RoleBinding in each): rbac.podNamespaces, the release namespace when that is
empty, and the namespace of each modelDeployments entry. A JSON list, sorted. */}}
{{- define "vramctl.podNamespaces" -}}
{{- $out := list -}}
{{- range .Values.rbac.podNamespaces }}
{{- $out = append $out . -}}
{{- end }}
{{- if not $out }}
{{- $out = append $out .Release.Namespace -}}
{{- end }}
{{- range .Values.modelDeployments }}
{{- $out = append $out (.namespace | default $.Release.Namespace) -}}
{{- end }}
{{- $out | uniq | sortAlpha | toJson -}}
{{- end }}
