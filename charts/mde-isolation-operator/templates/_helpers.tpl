{{/*
Chart name, truncated to the 63 characters a label value allows.
*/}}
{{- define "mde-isolation-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name of the release's resources: the release name, plus the chart name unless the release
name already contains it.
*/}}
{{- define "mde-isolation-operator.fullname" -}}
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

{{/*
Chart label value: name-version.
*/}}
{{- define "mde-isolation-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels of every resource.
*/}}
{{- define "mde-isolation-operator.labels" -}}
helm.sh/chart: {{ include "mde-isolation-operator.chart" . }}
{{ include "mde-isolation-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: operator
{{- end }}

{{/*
Selector labels: stable across upgrades (Deployment selectors are immutable).
*/}}
{{- define "mde-isolation-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mde-isolation-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Name of the ServiceAccount the operator runs as.
*/}}
{{- define "mde-isolation-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "mde-isolation-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Operator image reference: repository@digest when a digest is set, else repository:tag (the tag
defaults to the chart's appVersion).
*/}}
{{- define "mde-isolation-operator.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag | toString) }}
{{- end }}
{{- end }}

{{/*
Namespaces the operator watches, as a JSON list (use with fromJsonArray): watchNamespaces, or the
release namespace when it is empty. Empty list with watchAllNamespaces.
*/}}
{{- define "mde-isolation-operator.watchNamespaces" -}}
{{- if .Values.watchAllNamespaces }}
{{- list | toJson }}
{{- else if .Values.watchNamespaces }}
{{- .Values.watchNamespaces | uniq | toJson }}
{{- else }}
{{- list .Release.Namespace | toJson }}
{{- end }}
{{- end }}

{{/*
Rules on DeviceIsolations and events: shared by the per-namespace Roles and the ClusterRole.
- deviceisolations get/list/watch: the controller's watch (list + watch) and reads of one object.
- deviceisolations/status get/patch/update: status is written through the status subresource
  only; the operator never changes spec or metadata.
- events.k8s.io events create: the operator creates one events.k8s.io/v1 Event per transition
  and never changes one afterwards.
*/}}
{{- define "mde-isolation-operator.watchRules" -}}
- apiGroups: ["isolation.mde.dev"]
  resources: ["deviceisolations"]
  # create, patch, delete: a DeviceIsolationSet's children (one per selected device).
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["isolation.mde.dev"]
  resources: ["deviceisolations/status"]
  verbs: ["get", "patch", "update"]
- apiGroups: ["isolation.mde.dev"]
  resources: ["deviceisolationsets"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["isolation.mde.dev"]
  resources: ["deviceisolationsets/status"]
  verbs: ["get", "patch", "update"]
- apiGroups: ["isolation.mde.dev"]
  # A child's ownerReference blocks its set's foreground deletion, which needs this where the
  # OwnerReferencesPermissionEnforcement admission plugin is on.
  resources: ["deviceisolationsets/finalizers"]
  verbs: ["update"]
- apiGroups: ["isolation.mde.dev"]
  # MdeConnections of the watched namespaces (their Secrets: connections.enabled).
  resources: ["mdeconnections"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["isolation.mde.dev"]
  resources: ["mdeconnections/status"]
  verbs: ["get", "patch", "update"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create"]
{{- end }}

{{/*
Checks of values that the templates cannot express; called once from the Deployment.
*/}}
{{- define "mde-isolation-operator.validate" -}}
{{- $replicas := int .Values.replicas }}
{{- if lt $replicas 0 }}
{{- fail (printf "replicas must be 0 or more, got %d" $replicas) }}
{{- end }}
{{- if and (gt $replicas 1) (not .Values.leaderElection.enabled) }}
{{- fail (printf "replicas is %d but leaderElection.enabled is false: without leader election every replica would call the MDE API. Set leaderElection.enabled=true or replicas=1." $replicas) }}
{{- end }}
{{- if not (has .Values.strategyType (list "Recreate" "RollingUpdate")) }}
{{- fail (printf "strategyType must be Recreate or RollingUpdate, got %q" (toString .Values.strategyType)) }}
{{- end }}
{{- if and (eq .Values.strategyType "RollingUpdate") (not .Values.leaderElection.enabled) }}
{{- fail "strategyType RollingUpdate needs leaderElection.enabled=true: during a rolling update two operators would call the MDE API at once." }}
{{- end }}
{{- if and .Values.watchAllNamespaces .Values.watchNamespaces }}
{{- fail "set either watchNamespaces or watchAllNamespaces=true, not both" }}
{{- end }}
{{- if not (has .Values.mde.cloud (list "commercial" "gcc" "gcc-high" "dod")) }}
{{- fail (printf "mde.cloud must be one of commercial, gcc, gcc-high, dod; got %q" (toString .Values.mde.cloud)) }}
{{- end }}
{{- if not (has .Values.logFormat (list "text" "json")) }}
{{- fail (printf "logFormat must be text or json, got %q" (toString .Values.logFormat)) }}
{{- end }}
{{- $budget := float64 .Values.mde.quotaBudget }}
{{- if or (le $budget 0.0) (gt $budget 1.0) }}
{{- fail (printf "mde.quotaBudget must be in (0, 1], got %v" .Values.mde.quotaBudget) }}
{{- end }}
{{- if not (has .Values.mde.quotaKey (list "endpoint" "app")) }}
{{- fail (printf "mde.quotaKey must be endpoint or app, got %q" (toString .Values.mde.quotaKey)) }}
{{- end }}
{{- end }}
