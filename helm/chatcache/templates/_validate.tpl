{{/*
Checks across values that a JSON schema cannot express. Included once, by configmap.yaml, so a
bad combination stops `helm install` with a sentence saying what to change.
*/}}
{{- define "chatcache.validate" -}}
{{- $ports := .Values.sidecar.ports }}
{{- if eq ($ports.http | int) ($ports.admin | int) }}
{{- fail (printf "sidecar.ports.http and sidecar.ports.admin are both %d; chatcache needs two ports" ($ports.http | int)) }}
{{- end }}
{{- /* coderd's own listeners in the same pod: 3000 is where the example moves coderd,
       2112 its Prometheus endpoint, 6060 its pprof endpoint. */}}
{{- range $role, $port := $ports }}
{{- if has ($port | int) (list 2112 6060) }}
{{- fail (printf "sidecar.ports.%s is %d, which coderd itself listens on in the same pod" $role ($port | int)) }}
{{- end }}
{{- end }}
{{- if hasSuffix (printf ":%d" ($ports.http | int)) (trimSuffix "/" .Values.config.upstream_url) }}
{{- fail (printf "config.upstream_url (%s) points at chatcache's own port %d: chatcache would proxy to itself" .Values.config.upstream_url ($ports.http | int)) }}
{{- end }}
{{- if .Values.pdb.enabled }}
{{- $min := toString .Values.pdb.minAvailable }}
{{- $max := toString .Values.pdb.maxUnavailable }}
{{- if and (ne $min "") (ne $max "") }}
{{- fail "pdb: set only one of minAvailable and maxUnavailable (set the other to \"\")" }}
{{- end }}
{{- if and (eq $min "") (eq $max "") }}
{{- fail "pdb: set one of minAvailable and maxUnavailable" }}
{{- end }}
{{- end }}
{{- if and .Values.serviceMonitor.enabled (not .Values.service.enabled) }}
{{- fail "serviceMonitor.enabled needs service.enabled: the ServiceMonitor scrapes through the Service" }}
{{- end }}
{{- if and .Values.serviceMonitor.enabled (eq (toString .Values.service.ports.admin) "") }}
{{- fail "serviceMonitor.enabled needs service.ports.admin: /metrics is served on the admin port" }}
{{- end }}
{{- end }}
