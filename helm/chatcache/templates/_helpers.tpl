{{/*
Named templates of the chatcache chart.

Each one takes the chart's root context. A parent chart that lists chatcache as a dependency
reaches that context as `.Subcharts.chatcache`, so it can put the sidecar into its own pods
with:

  initContainers:
    - {{- include "chatcache.sidecarContainer" .Subcharts.chatcache | nindent 6 }}
  volumes:
    {{- include "chatcache.sidecarVolumes" .Subcharts.chatcache | nindent 4 }}
*/}}

{{/* The short name: "chatcache" unless nameOverride says otherwise. */}}
{{- define "chatcache.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The prefix of every object name. A release named after the chart is not repeated: release
"chatcache" gives "chatcache", release "prod" gives "prod-chatcache".
*/}}
{{- define "chatcache.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := include "chatcache.name" . }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* The ConfigMap that holds config.toml. */}}
{{- define "chatcache.configMapName" -}}
{{- include "chatcache.fullname" . }}
{{- end }}

{{/* Labels that identify this release's own objects (the Service, for the ServiceMonitor). */}}
{{- define "chatcache.selectorLabels" -}}
app.kubernetes.io/name: {{ include "chatcache.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels of every object the chart renders. */}}
{{- define "chatcache.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "chatcache.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: sidecar
app.kubernetes.io/part-of: coder
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The image reference: repository@digest when a digest is set, else repository:tag. */}}
{{- define "chatcache.image" -}}
{{- $image := .Values.image }}
{{- if $image.digest }}
{{- printf "%s@%s" $image.repository $image.digest }}
{{- else }}
{{- printf "%s:%s" $image.repository (default .Chart.AppVersion $image.tag) }}
{{- end }}
{{- end }}

{{/*
host:port for a listener. An IPv6 address is put in brackets, so "::" and "[::]" both work.
Takes a list: (host, port).
*/}}
{{- define "chatcache.hostPort" -}}
{{- $host := index . 0 }}
{{- $port := index . 1 | int }}
{{- if and (contains ":" $host) (not (hasPrefix "[" $host)) }}
{{- $host = printf "[%s]" $host }}
{{- end }}
{{- printf "%s:%d" $host $port }}
{{- end }}

{{/*
config.toml, rendered from .Values.config. Strings go through toJson, whose output is a valid
TOML basic string; numbers through int64, because YAML numbers reach templates as floats and
would otherwise print as 2.68435456e+08. The database URL is never written here: it comes
from a Secret, as CHATCACHE_DATABASE_URL or as the file database_url_file names.
*/}}
{{- define "chatcache.configToml" -}}
{{- $c := .Values.config -}}
# config.toml of chatcache, rendered by the chatcache Helm chart from its values.
# Change the chart's values rather than this file; unknown fields stop chatcache at start.
listen_addr = {{ include "chatcache.hostPort" (list .Values.sidecar.bindAddress .Values.sidecar.ports.http) | toJson }}
admin_addr = {{ include "chatcache.hostPort" (list .Values.sidecar.bindAddress .Values.sidecar.ports.admin) | toJson }}
upstream_url = {{ $c.upstream_url | toJson }}
{{- if eq .Values.database.mountAs "file" }}
database_url_file = {{ printf "%s/%s" (trimSuffix "/" .Values.database.fileMountPath) .Values.database.secretKey | toJson }}
{{- end }}
framing = {{ $c.framing | toJson }}
log_format = {{ $c.log_format | toJson }}
log_level = {{ $c.log_level | toJson }}
shutdown_grace_ms = {{ $c.shutdown_grace_ms | int64 }}

[cache]
max_messages_per_chat = {{ $c.cache.max_messages_per_chat | int64 }}
max_bytes_per_chat = {{ $c.cache.max_bytes_per_chat | int64 }}
max_bytes = {{ $c.cache.max_bytes | int64 }}
hole_grace_ms = {{ $c.cache.hole_grace_ms | int64 }}

[feed]
linger_ms = {{ $c.feed.linger_ms | int64 }}
connect_timeout_ms = {{ $c.feed.connect_timeout_ms | int64 }}

[authz]
ttl_ms = {{ $c.authz.ttl_ms | int64 }}
timeout_ms = {{ $c.authz.timeout_ms | int64 }}

[stream]
ping_interval_ms = {{ $c.stream.ping_interval_ms | int64 }}
subscriber_queue_events = {{ $c.stream.subscriber_queue_events | int64 }}

[db]
pool_max_size = {{ $c.db.pool_max_size | int64 }}
connect_timeout_ms = {{ $c.db.connect_timeout_ms | int64 }}
{{ end }}

{{/* Port names, shared by the container, the Service and the ServiceMonitor. */}}
{{- define "chatcache.httpPortName" -}}chatcache-http{{- end }}
{{- define "chatcache.adminPortName" -}}chatcache-admin{{- end }}

{{/*
The sidecar container: one item of a pod's initContainers (sidecar.native, the default) or
containers list. Hardened to the restricted Pod Security Standard by default. Liveness looks
only at the process (/live); readiness at coderd and Postgres (/ready). There is deliberately
no startup probe on /ready: a native sidecar's startup probe holds back the pod's main
containers, and /ready waits for coderd, one of those containers.
*/}}
{{- define "chatcache.sidecarContainer" -}}
{{- $s := .Values.sidecar -}}
name: {{ $s.name }}
image: {{ include "chatcache.image" . | quote }}
imagePullPolicy: {{ .Values.image.pullPolicy }}
{{- if $s.native }}
restartPolicy: Always
{{- end }}
command:
  - /usr/local/bin/chatcache
  - --config
  - /etc/chatcache/config.toml
{{- if or (eq .Values.database.mountAs "env") $s.extraEnv }}
env:
  {{- if eq .Values.database.mountAs "env" }}
  - name: CHATCACHE_DATABASE_URL
    valueFrom:
      secretKeyRef:
        name: {{ .Values.database.secretName | quote }}
        key: {{ .Values.database.secretKey | quote }}
  {{- end }}
  {{- with $s.extraEnv }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end }}
ports:
  - name: {{ include "chatcache.httpPortName" . }}
    containerPort: {{ $s.ports.http | int }}
    protocol: TCP
  - name: {{ include "chatcache.adminPortName" . }}
    containerPort: {{ $s.ports.admin | int }}
    protocol: TCP
livenessProbe:
  httpGet:
    path: /live
    port: {{ include "chatcache.adminPortName" . }}
  periodSeconds: {{ $s.livenessProbe.periodSeconds | int }}
  timeoutSeconds: {{ $s.livenessProbe.timeoutSeconds | int }}
  failureThreshold: {{ $s.livenessProbe.failureThreshold | int }}
readinessProbe:
  httpGet:
    path: /ready
    port: {{ include "chatcache.adminPortName" . }}
  periodSeconds: {{ $s.readinessProbe.periodSeconds | int }}
  timeoutSeconds: {{ $s.readinessProbe.timeoutSeconds | int }}
  failureThreshold: {{ $s.readinessProbe.failureThreshold | int }}
resources:
  {{- toYaml $s.resources | nindent 2 }}
securityContext:
  {{- toYaml $s.securityContext | nindent 2 }}
volumeMounts:
  - name: {{ $s.configVolumeName }}
    mountPath: /etc/chatcache
    readOnly: true
  {{- if eq .Values.database.mountAs "file" }}
  - name: {{ $s.configVolumeName }}-db
    mountPath: {{ .Values.database.fileMountPath }}
    readOnly: true
  {{- end }}
{{- end }}

{{/*
The pod volumes the sidecar mounts, as list items. The ConfigMap is mounted as a directory,
not with subPath, so a changed ConfigMap reaches the file in the running pod.
*/}}
{{- define "chatcache.sidecarVolumes" -}}
- name: {{ .Values.sidecar.configVolumeName }}
  configMap:
    name: {{ include "chatcache.configMapName" . }}
{{- if eq .Values.database.mountAs "file" }}
- name: {{ .Values.sidecar.configVolumeName }}-db
  secret:
    secretName: {{ .Values.database.secretName | quote }}
    items:
      - key: {{ .Values.database.secretKey | quote }}
        path: {{ .Values.database.secretKey | quote }}
    # Readable by the container's non-root user without a pod-level fsGroup.
    defaultMode: 0444
{{- end }}
{{- end }}

{{/* A sha256 of config.toml, for a pod annotation that rolls coder's pods on a change. */}}
{{- define "chatcache.configChecksum" -}}
{{- include "chatcache.configToml" . | sha256sum }}
{{- end }}

{{/* A PodDisruptionBudget count: a number stays a number, "50%" stays a string. */}}
{{- define "chatcache.intOrPercent" -}}
{{- if hasSuffix "%" (toString .) }}
{{- toString . | quote }}
{{- else }}
{{- . | int }}
{{- end }}
{{- end }}
