{{/* Names and labels as `helm create` makes them. */}}
{{- define "pdgate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "pdgate.fullname" -}}
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

{{- define "pdgate.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "pdgate.labels" -}}
helm.sh/chart: {{ include "pdgate.chart" . }}
{{ include "pdgate.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "pdgate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pdgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The gateway's pods (engines carry app.kubernetes.io/component=prefill|decode). */}}
{{- define "pdgate.gatewaySelectorLabels" -}}
{{ include "pdgate.selectorLabels" . }}
app.kubernetes.io/component: gateway
{{- end }}

{{- define "pdgate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "pdgate.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "pdgate.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/* A model name in DNS-label form, as the pdgate.io/model label holds it. */}}
{{- define "pdgate.modelLabel" -}}
{{- regexReplaceAll "[^a-z0-9.-]+" (lower .) "-" | trunc 63 | trimAll "-." }}
{{- end }}

{{/* The PD protocol a worker group speaks. Argument: the merged group. */}}
{{- define "pdgate.protocol" -}}
{{- if eq .engine "vllm" }}{{ printf "vllm-%s" .vllm.connector }}
{{- else if eq .engine "sglang" }}sglang
{{- else }}native
{{- end }}
{{- end }}

{{/* A prefill engine's bootstrap port, or nothing. Argument: the merged group. */}}
{{- define "pdgate.bootstrapPort" -}}
{{- if eq .engine "sglang" }}{{ .sglang.bootstrapPort }}
{{- else if and (eq .engine "vllm") (eq .vllm.connector "mooncake") }}{{ .vllm.bootstrapPort }}
{{- end }}
{{- end }}

{{/* Engine ↔ engine ports of a group: side channel, bootstrap or transfer port. */}}
{{- define "pdgate.transferPorts" -}}
{{- if eq .engine "vllm" }}
{{- if eq .vllm.connector "nixl" }}[{{ .vllm.sideChannelPort }}]{{ else }}[{{ .vllm.bootstrapPort }}]{{ end }}
{{- else if eq .engine "sglang" }}[{{ .sglang.bootstrapPort }}]
{{- else }}[{{ .reference.transferPort }}]
{{- end }}
{{- end }}

{{/* The worker groups with workerDefaults merged under each. */}}
{{- define "pdgate.groups" -}}
{{- $out := list }}
{{- range .Values.workerGroups }}
{{- $out = append $out (mustMergeOverwrite (deepCopy $.Values.workerDefaults) (deepCopy .)) }}
{{- end }}
{{- toJson $out }}
{{- end }}

{{/*
A worker group's [discovery] as JSON: Kubernetes discovery of its own pods, by role, model label
and release. Argument: dict "g" $group "root" $.
*/}}
{{- define "pdgate.groupDiscovery" -}}
{{- $model := include "pdgate.modelLabel" .g.model }}
{{- $sel := printf "pdgate.io/model=%s,app.kubernetes.io/instance=%s" $model .root.Release.Name }}
{{- toJson (dict "kind" "kubernetes" "kubernetes" (dict "namespace" .root.Release.Namespace "prefill_selector" (printf "pdgate.io/role=prefill,%s" $sel) "decode_selector" (printf "pdgate.io/role=decode,%s" $sel))) }}
{{- end }}

{{- define "pdgate.fleetSecretName" -}}
{{- .Values.fleetSecret.existingSecret | default (printf "%s-fleet" (include "pdgate.fullname" .)) }}
{{- end }}
{{- define "pdgate.adminSecretName" -}}
{{- .Values.adminToken.existingSecret | default (printf "%s-admin" (include "pdgate.fullname" .)) }}
{{- end }}
{{- define "pdgate.apiKeysSecretName" -}}
{{- .Values.apiKeys.existingSecret | default (printf "%s-api-keys" (include "pdgate.fullname" .)) }}
{{- end }}
{{- define "pdgate.hasApiKeys" -}}
{{- if or .Values.apiKeys.existingSecret .Values.apiKeys.keys }}true{{ end }}
{{- end }}

{{/*
A TOML table: scalars and lists of scalars as `key = value` (JSON's string, number and array
forms are TOML's too), then each nested map as its own [path.key] table.
Argument: dict "path" "a.b" "table" $map.
*/}}
{{- define "pdgate.tomlTable" -}}
{{- $path := .path }}
{{- $table := .table }}
{{- printf "[%s]\n" $path }}
{{- range $k, $v := $table }}
{{- if not (kindIs "map" $v) }}
{{- if kindIs "float64" $v }}
{{- if eq $v (floor $v) }}{{ printf "%s = %d\n" $k (int64 $v) }}{{ else }}{{ printf "%s = %v\n" $k $v }}{{ end }}
{{- else if kindIs "int64" $v }}{{ printf "%s = %d\n" $k $v }}
{{- else }}{{ printf "%s = %s\n" $k (toJson $v) }}
{{- end }}
{{- end }}
{{- end }}
{{- range $k, $v := $table }}
{{- if kindIs "map" $v }}
{{- printf "\n" }}{{ include "pdgate.tomlTable" (dict "path" (printf "%s.%s" $path $k) "table" $v) }}
{{- end }}
{{- end }}
{{- end }}
