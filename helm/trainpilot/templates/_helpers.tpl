{{- define "trainpilot.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "trainpilot.fullname" -}}
{{- if contains .Chart.Name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "trainpilot.selectorLabels" -}}
app.kubernetes.io/name: {{ include "trainpilot.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "trainpilot.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "trainpilot.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: trainpilot
{{- end }}

{{- define "trainpilot.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "trainpilot.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The one namespace watched when watchAllNamespaces is false. */}}
{{- define "trainpilot.watchNamespace" -}}
{{- default .Release.Namespace .Values.watchNamespace }}
{{- end }}

{{/* What the operator does to namespaced objects: a Role's rules, or part of the ClusterRole. */}}
{{- define "trainpilot.namespacedRules" -}}
- apiGroups: [trainpilot.dev]
  resources: [agentexperiments]
  verbs: [get, list, watch, patch, update]
- apiGroups: [trainpilot.dev]
  resources: [agentexperiments/status]
  verbs: [get, patch, update]
- apiGroups: [batch]
  resources: [jobs]
  verbs: [create, get, list, watch, patch, delete]
- apiGroups: [""]
  resources: [services, configmaps]
  verbs: [create, get, list, watch, patch, delete]
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch]
- apiGroups: ["", events.k8s.io]
  resources: [events]
  verbs: [create, patch]
{{- end }}
