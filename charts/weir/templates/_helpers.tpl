{{/*
Expand the name of the chart.
*/}}
{{- define "weir.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Create a default fully qualified app name.
We truncate at 63 chars because some Kubernetes name fields are limited to this (by the DNS naming spec).
If release name contains chart name it will be used as a full name.
*/}}
{{- define "weir.fullname" -}}
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
Create chart name and version as used by the chart label.
*/}}
{{- define "weir.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Common labels
*/}}
{{- define "weir.labels" -}}
helm.sh/chart: {{ include "weir.chart" . }}
{{ include "weir.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Selector labels
*/}}
{{- define "weir.selectorLabels" -}}
app.kubernetes.io/name: {{ include "weir.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Create the name of the service account to use
*/}}
{{- define "weir.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "weir.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Name of a component's objects: the fullname plus a suffix, within 63 characters.
Usage: include "weir.componentName" (list . "outbox-relay")
*/}}
{{- define "weir.componentName" -}}
{{- $ctx := index . 0 }}
{{- $suffix := index . 1 }}
{{- printf "%s-%s" (include "weir.fullname" $ctx | trunc (int (sub 62 (len $suffix))) | trimSuffix "-") $suffix }}
{{- end }}

{{/*
The image reference: repository, then @digest or :tag (the appVersion by default).
*/}}
{{- define "weir.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/*
Fail the render on settings that contradict each other.
*/}}
{{- define "weir.validate" -}}
{{- if and .Values.autoscaling.enabled .Values.keda.enabled }}
{{- fail "autoscaling.enabled and keda.enabled are mutually exclusive: KEDA manages its own HorizontalPodAutoscaler" }}
{{- end }}
{{- if lt (int .Values.shutdown.graceMarginSeconds) 5 }}
{{- fail "shutdown.graceMarginSeconds must be at least 5" }}
{{- end }}
{{- if lt (int .Values.shutdown.drainTimeoutSeconds) 1 }}
{{- fail "shutdown.drainTimeoutSeconds must be at least 1" }}
{{- end }}
{{- with .Values.config.kafka }}
{{- if hasKey . "brokers" }}
{{- fail "set kafka.brokers, not config.kafka.brokers" }}
{{- end }}
{{- if hasKey . "properties" }}
{{- fail "set kafka.properties (and secrets through kafka.existingSecret), not config.kafka.properties" }}
{{- end }}
{{- end }}
{{- with .Values.config.consumer }}
{{- if hasKey . "drain_timeout" }}
{{- fail "set shutdown.drainTimeoutSeconds, not config.consumer.drain_timeout: the pod's terminationGracePeriodSeconds is derived from it" }}
{{- end }}
{{- end }}
{{- if and .Values.worker.enabled (not .Values.temporal.address) }}
{{- fail "worker.enabled needs temporal.address (the Temporal frontend the workers poll)" }}
{{- end }}
{{- if and .Values.worker.enabled (not .Values.database.existingSecret) }}
{{- fail "worker.enabled needs database.existingSecret (the activities write the task rows)" }}
{{- end }}
{{- with .Values.config.temporal }}
{{- if or (hasKey . "address") (hasKey . "namespace") (hasKey . "task_queue") (hasKey . "worker_in_serve") }}
{{- fail "set temporal.address, temporal.namespace, temporal.taskQueue and worker.enabled, not config.temporal" }}
{{- end }}
{{- end }}
{{- /* The reference service's test hooks let anyone who can publish panic, hang or dead-letter a replica. */}}
{{- if hasKey (.Values.config.service | default dict) "test_hooks" }}
{{- fail "config.service.test_hooks: the reference service's test hooks are for tests and the demo; the chart never sets them" }}
{{- end }}
{{- range .Values.extraEnv }}
{{- if eq (upper .name) "WEIR_SERVICE__TEST_HOOKS" }}
{{- fail "extraEnv WEIR_SERVICE__TEST_HOOKS: the reference service's test hooks are for tests and the demo; the chart never sets them" }}
{{- end }}
{{- end }}
{{- if and (or .Values.outboxRelay.enabled .Values.migration.enabled) (not .Values.database.existingSecret) }}
{{- fail "outboxRelay and migration need database.existingSecret (a Secret holding the PostgreSQL URL)" }}
{{- end }}
{{- if and .Values.console.enabled (not .Values.console.existingSecret) }}
{{- fail "console.enabled needs console.existingSecret (a Secret holding the viewer and operator tokens): the console refuses to start without tokens" }}
{{- end }}
{{- if and .Values.keda.authentication (not (or .Values.kafka.existingSecret .Values.kafka.tls.existingSecret)) }}
{{- fail "keda.authentication needs kafka.existingSecret or kafka.tls.existingSecret" }}
{{- end }}
{{- end }}

{{/*
A TOML key: bare when it only has A-Za-z0-9_-, quoted otherwise.
*/}}
{{- define "weir.tomlKey" -}}
{{- if regexMatch "^[A-Za-z0-9_-]+$" . }}{{ . }}{{ else }}{{ toJson . }}{{ end }}
{{- end }}

{{/*
A TOML value. Helm reads YAML numbers as floats, so whole numbers are written as integers
(Helm's toToml would write 1024 as 1024.0, which Weir's integer settings reject).
*/}}
{{- define "weir.tomlValue" -}}
{{- if kindIs "string" . }}{{ toJson . }}
{{- else if kindIs "bool" . }}{{ ternary "true" "false" . }}
{{- else if or (kindIs "float64" .) (kindIs "float32" .) }}{{ if eq (float64 .) (floor .) }}{{ printf "%d" (int64 .) }}{{ else }}{{ . }}{{ end }}
{{- else if or (kindIs "int" .) (kindIs "int64" .) (kindIs "int32" .) (kindIs "uint64" .) }}{{ printf "%d" . }}
{{- else if kindIs "slice" . }}[{{ range $i, $v := . }}{{ if $i }}, {{ end }}{{ include "weir.tomlValue" $v }}{{ end }}]
{{- else if kindIs "invalid" . }}{{ fail "a null in config cannot be written as TOML" }}
{{- else }}{{ fail (printf "cannot write %v (%s) as TOML" . (kindOf .)) }}
{{- end }}
{{- end }}

{{/*
A TOML table: its scalar keys, then its sub-tables under [path.key] headers.
Usage: include "weir.tomlTable" (dict "path" "" "table" $map)
*/}}
{{- define "weir.tomlTable" -}}
{{- $path := .path }}
{{- $table := .table }}
{{- range $key := keys $table | sortAlpha }}
{{- $value := get $table $key }}
{{- if not (kindIs "map" $value) }}
{{ include "weir.tomlKey" $key }} = {{ include "weir.tomlValue" $value }}
{{- end }}
{{- end }}
{{- range $key := keys $table | sortAlpha }}
{{- $value := get $table $key }}
{{- if kindIs "map" $value }}
{{- $sub := ternary (include "weir.tomlKey" $key) (printf "%s.%s" $path (include "weir.tomlKey" $key)) (eq $path "") }}

[{{ $sub }}]
{{- include "weir.tomlTable" (dict "path" $sub "table" $value) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Weir's configuration as a map: `config` plus the `kafka` values and TLS file locations.
*/}}
{{- define "weir.configMap" -}}
{{- $config := deepCopy .Values.config }}
{{- $kafka := deepCopy (default dict (get $config "kafka")) }}
{{- $properties := deepCopy (default dict .Values.kafka.properties) }}
{{- with .Values.kafka.tls }}
{{- if .existingSecret }}
{{- if .caKey }}{{ $_ := set $properties "ssl.ca.location" (printf "/etc/weir/kafka-tls/%s" .caKey) }}{{ end }}
{{- if .certKey }}{{ $_ := set $properties "ssl.certificate.location" (printf "/etc/weir/kafka-tls/%s" .certKey) }}{{ end }}
{{- if .keyKey }}{{ $_ := set $properties "ssl.key.location" (printf "/etc/weir/kafka-tls/%s" .keyKey) }}{{ end }}
{{- end }}
{{- end }}
{{- $_ := set $kafka "brokers" .Values.kafka.brokers }}
{{- if $properties }}{{ $_ := set $kafka "properties" $properties }}{{ end }}
{{- $_ := set $config "kafka" $kafka }}
{{- with .Values.temporal }}
{{- if .address }}
{{- $temporal := deepCopy (default dict (get $config "temporal")) }}
{{- $_ := set $temporal "address" .address }}
{{- $_ := set $temporal "namespace" .namespace }}
{{- $_ := set $temporal "task_queue" .taskQueue }}
{{- $_ := set $temporal "worker_in_serve" (not $.Values.worker.enabled) }}
{{- $_ := set $config "temporal" $temporal }}
{{- end }}
{{- end }}
{{- toJson $config }}
{{- end }}

{{/*
Environment shared by the Weir containers that talk to Kafka (serve, outbox-relay).
*/}}
{{- define "weir.kafkaEnv" -}}
- name: WEIR_ADMIN_ADDR
  value: {{ printf "0.0.0.0:%d" (int .Values.admin.port) | quote }}
- name: WEIR_CONSUMER__DRAIN_TIMEOUT
  value: {{ printf "%ds" (int .Values.shutdown.drainTimeoutSeconds) | quote }}
{{- if .Values.kafka.existingSecret }}
{{- range $property := keys .Values.kafka.secretProperties | sortAlpha }}
{{- $key := get $.Values.kafka.secretProperties $property }}
{{- if $key }}
- name: {{ printf "WEIR_KAFKA__PROPERTIES__%s" (upper $property) | quote }}
  valueFrom:
    secretKeyRef:
      name: {{ $.Values.kafka.existingSecret | quote }}
      key: {{ $key | quote }}
{{- end }}
{{- end }}
{{- end }}
{{- include "weir.databaseEnv" . }}
{{- with .Values.logLevel }}
- name: RUST_LOG
  value: {{ . | quote }}
{{- end }}
{{- end }}

{{/*
WEIR_DATABASE__URL from the existing Secret, when one is named.
*/}}
{{- define "weir.databaseEnv" -}}
{{- if .Values.database.existingSecret }}
- name: WEIR_DATABASE__URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.database.existingSecret | quote }}
      key: {{ .Values.database.urlKey | quote }}
{{- end }}
{{- end }}

{{/*
Volumes every Weir pod that reads the configuration has: config, /tmp, Kafka TLS files.
*/}}
{{- define "weir.commonVolumes" -}}
- name: config
  configMap:
    name: {{ include "weir.fullname" . }}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.tmpDir.sizeLimit }}
{{- if .Values.kafka.tls.existingSecret }}
- name: kafka-tls
  secret:
    secretName: {{ .Values.kafka.tls.existingSecret | quote }}
    defaultMode: 0440
{{- end }}
{{- end }}

{{- define "weir.commonVolumeMounts" -}}
- name: config
  mountPath: /etc/weir/config
  readOnly: true
- name: tmp
  mountPath: /tmp
{{- if .Values.kafka.tls.existingSecret }}
- name: kafka-tls
  mountPath: /etc/weir/kafka-tls
  readOnly: true
{{- end }}
{{- end }}

{{/*
Pod-level fields shared by the chart's pods.
*/}}
{{- define "weir.podCommon" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
serviceAccountName: {{ include "weir.serviceAccountName" . }}
automountServiceAccountToken: {{ .Values.serviceAccount.automount }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.priorityClassName }}
priorityClassName: {{ . | quote }}
{{- end }}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}
