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

{{/* What the operator does to namespaced objects: a Role's rules, or part of the ClusterRole.
     Least privilege: tests/controller/test_rbac.py runs the operator with exactly these rules and
     fails on any rule the operator does not use (or on any 403). */}}
{{- define "trainpilot.namespacedRules" -}}
# kopf watches the experiments and patches its finalizer and bookkeeping annotations onto them.
- apiGroups: [trainpilot.dev]
  resources: [agentexperiments]
  verbs: [list, watch, patch]
- apiGroups: [trainpilot.dev]
  resources: [agentexperiments/status]
  verbs: [patch]
# Children carry a blocking ownerReference to their experiment, which needs this where the
# OwnerReferencesPermissionEnforcement admission plugin is on (OpenShift, hardened clusters).
- apiGroups: [trainpilot.dev]
  resources: [agentexperiments/finalizers]
  verbs: [update]
# Trials: Jobs, their rendezvous Services; a child that already exists is read to check its owner;
# spec.retention deletes a finished trial's, and creates a Job that deletes its checkpoints.
- apiGroups: [batch]
  resources: [jobs]
  verbs: [create, get, list, delete]
- apiGroups: [""]
  resources: [services]
  verbs: [create, get, list, delete]
# Trial config and control ConfigMaps (control: patched by in-place mutates); the ledger (PUT); the
# bounded cycle log and prompt archive (PUT; their oldest segments deleted).
- apiGroups: [""]
  resources: [configmaps]
  verbs: [create, get, list, patch, update, delete]
# Metric scraping and trial state from the trials' pods; a stopped trial's pods are watched until
# they are gone, for the checkpoint step each one's last status reports (a restart's hand-off).
- apiGroups: [""]
  resources: [pods]
  verbs: [list, watch]
# A multi-node trial's checkpoint claim must be ReadWriteMany: read at launch.
- apiGroups: [""]
  resources: [persistentvolumeclaims]
  verbs: [get]
# Decision Events; a repeated warning updates its Event.
- apiGroups: [""]
  resources: [events]
  verbs: [create, patch]
# Kueue (spec.queue): a suspended trial's Workload says why it waits (queued, or preempted).
- apiGroups: [kueue.x-k8s.io]
  resources: [workloads]
  verbs: [list]
{{- end }}
