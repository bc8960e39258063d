{{/* Chart name, truncated to 63 characters. */}}
{{- define "kubetune.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name: the release name when it already contains the chart name. */}}
{{- define "kubetune.fullname" -}}
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

{{- define "kubetune.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels: stable across upgrades. */}}
{{- define "kubetune.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kubetune.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Common labels. */}}
{{- define "kubetune.labels" -}}
helm.sh/chart: {{ include "kubetune.chart" . }}
{{ include "kubetune.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: kubetune
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "kubetune.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kubetune.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "kubetune.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "kubetune.servingImage" -}}
{{- default (printf "ghcr.io/kubetune/serving:%s" .Chart.AppVersion) .Values.servingImage }}
{{- end }}

{{- define "kubetune.vllmServingImage" -}}
{{- default (printf "ghcr.io/kubetune/runtime-vllm:%s" .Chart.AppVersion) .Values.vllmServingImage }}
{{- end }}

{{- define "kubetune.gatewayImage" -}}
{{- default (printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag)) .Values.gatewayImage }}
{{- end }}

{{- define "kubetune.runtimeImage" -}}
{{- default (printf "ghcr.io/kubetune/runtime:%s" .Chart.AppVersion) .Values.runtimeImage }}
{{- end }}

{{/*
RBAC rules, generated from the code (kubetune.operator.permissions) into files/rbac-rules.yaml by
scripts/render_manifests.py: "namespaced" for a Role per watched namespace, "clusterwide" for what a
cluster-wide operator needs on top of them.
*/}}
{{- define "kubetune.generatedRules" -}}
{{- $rules := .Files.Get "files/rbac-rules.yaml" | fromYaml }}
{{- if not (and (hasKey $rules "namespaced") (hasKey $rules "clusterwide")) }}
{{- fail "files/rbac-rules.yaml is missing or malformed: run `python scripts/render_manifests.py`" }}
{{- end }}
{{- toYaml $rules }}
{{- end }}

{{- define "kubetune.rules" -}}
{{- (include "kubetune.generatedRules" . | fromYaml).namespaced | toYaml }}
{{- end }}

{{- define "kubetune.clusterRules" -}}
{{- (include "kubetune.generatedRules" . | fromYaml).clusterwide | toYaml }}
{{- end }}

{{/* Where the operator finds its projected KFP token (kfp.client.KF_PIPELINES_SA_TOKEN_PATH's default). */}}
{{- define "kubetune.kfpTokenDir" -}}
/var/run/secrets/kubeflow/pipelines
{{- end }}

{{/* Whether the operator talks to Kubeflow Pipelines: it is the default executor or has an endpoint. */}}
{{- define "kubetune.kfpEnabled" -}}
{{- if or (eq .Values.defaultExecutor "kfp") .Values.kfp.host }}true{{ end }}
{{- end }}

{{/* kfp.namespaceMap as KUBETUNE_KFP_NAMESPACE_MAP: namespace=kfpNamespace pairs, sorted. */}}
{{- define "kubetune.kfpNamespaceMap" -}}
{{- $pairs := list }}
{{- range $namespace, $target := .Values.kfp.namespaceMap }}
{{- $pairs = append $pairs (printf "%s=%s" $namespace $target) }}
{{- end }}
{{- join "," $pairs }}
{{- end }}

{{/* What the kfp executor cannot run without, refused at install time with the value to set. */}}
{{- define "kubetune.validateKfp" -}}
{{- if eq .Values.defaultExecutor "kfp" }}
{{- if not .Values.kfp.host }}
{{- fail "kfp.host is required when defaultExecutor=kfp: the Kubeflow Pipelines API endpoint, e.g. http://ml-pipeline.kubeflow:8888" }}
{{- end }}
{{- if not (hasPrefix "pvc://" .Values.workspaceRoot) }}
{{- fail (printf "workspaceRoot is required when defaultExecutor=kfp and must be pvc://CLAIM/...: the kfp executor needs shared storage its steps mount in the user's namespace (got %q)" .Values.workspaceRoot) }}
{{- end }}
{{- $store := .Values.artifactStore }}
{{- if not (or (hasPrefix "pvc://" $store) (hasPrefix "s3://" $store) (hasPrefix "gs://" $store) (hasPrefix "gcs://" $store) (hasPrefix "az://" $store) (hasPrefix "abfs://" $store)) }}
{{- fail (printf "artifactStore is required when defaultExecutor=kfp: the kfp executor needs shared storage (pvc://CLAIM/... or s3://...) to publish models to (got %q)" $store) }}
{{- end }}
{{- end }}
{{- if and (include "kubetune.kfpEnabled" .) (eq .Values.kfp.auth.mode "token") (not .Values.kfp.auth.tokenSecret.name) }}
{{- fail "kfp.auth.tokenSecret.name is required when kfp.auth.mode=token: the Secret holding the KFP bearer token" }}
{{- end }}
{{- end }}
