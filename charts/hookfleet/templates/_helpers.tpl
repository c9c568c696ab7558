{{/* Name of the chart (overridable). */}}
{{- define "hookfleet.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Prefix of every object: the release name, with the chart name unless the release name holds it. */}}
{{- define "hookfleet.fullname" -}}
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

{{- define "hookfleet.operatorName" -}}
{{- printf "%s-operator" (include "hookfleet.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "hookfleet.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/part-of: hookfleet
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Labels selecting the operator pods (stable: a Deployment selector is immutable). */}}
{{- define "hookfleet.selectorLabels" -}}
app.kubernetes.io/name: hookfleet-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "hookfleet.operatorLabels" -}}
{{ include "hookfleet.labels" . }}
{{ include "hookfleet.selectorLabels" . }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "hookfleet.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "hookfleet.operatorName" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "hookfleet.operatorImage" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "hookfleet.workerImage" -}}
{{- printf "%s:%s" .Values.worker.image.repository (default .Chart.AppVersion .Values.worker.image.tag) }}
{{- end }}

{{/* The PromQL label matchers that select the operator's scrape targets in the alert rules. */}}
{{- define "hookfleet.operatorSelector" -}}
{{- default (printf "job=%q" (printf "%s-metrics" (include "hookfleet.operatorName" .))) .Values.prometheusRule.operatorSelector }}
{{- end }}

{{/* Namespace of the operator's Lease and pods (the release namespace). */}}
{{- define "hookfleet.namespace" -}}
{{- .Release.Namespace }}
{{- end }}

{{/*
  The operator's rules, least privilege, in step with docs/operator.md ("RBAC it needs"; a test compares the
  two). Secrets: get only, the operator reads the ones an Integration references and never lists them. The
  workers get no rules at all: their pods mount no service-account token.
*/}}
{{- define "hookfleet.operatorRules" -}}
# patch: the queue finalizer (hookfleet.io/queues) of Integrations with deletionPolicy Delete, added and removed
# through a merge patch of metadata.finalizers guarded by resourceVersion.
- apiGroups: [hookfleet.io]
  resources: [integrations]
  verbs: [get, list, watch, patch]
- apiGroups: [hookfleet.io]
  resources: [integrations/status]
  verbs: [get, patch]
# Webhooks: read to compile each fleet's snapshot; their status written from the workers' reports.
- apiGroups: [hookfleet.io]
  resources: [webhooks]
  verbs: [get, list, watch]
- apiGroups: [hookfleet.io]
  resources: [webhooks/status]
  verbs: [get, patch, update]
- apiGroups: [apps]
  resources: [deployments]
  verbs: [get, list, watch, create, patch]
- apiGroups: [policy]
  resources: [poddisruptionbudgets]
  verbs: [get, list, watch, create, patch]
- apiGroups: [""]
  resources: [services]
  verbs: [get, list, watch, create, patch]
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch]
# get: the referenced keys exist and the broker URI for status; list/watch: metadata only, so a changed
# Secret rolls the workers that reference it (checksum annotation) without waiting for a resync.
- apiGroups: [""]
  resources: [secrets]
  verbs: [get, list, watch]
# A Webhooks fleet's snapshot Secret (<integration>-webhooks), applied by the operator.
- apiGroups: [""]
  resources: [secrets]
  verbs: [create, patch, update]
# A Webhooks fleet's workers' identity: a ServiceAccount and a Role that reads only the fleet's snapshot
# Secret, by name. Granting that Role needs the operator to hold secrets get/list/watch itself (above):
# no escalate or bind verb.
- apiGroups: [""]
  resources: [serviceaccounts]
  verbs: [get, list, watch, create, patch, update, delete]
- apiGroups: [rbac.authorization.k8s.io]
  resources: [roles, rolebindings]
  verbs: [get, list, watch, create, patch, update, delete]
- apiGroups: [events.k8s.io]
  resources: [events]
  verbs: [create, patch]
{{- end }}
