{{- define "ortmux.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "ortmux.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "ortmux.labels" -}}
{{ include "ortmux.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* The worker's settings as TOML: the user's config plus what the chart decides. Written by
hand because values hold every number as a float, and integer settings must stay integers. */}}
{{- define "ortmux.config" -}}
{{- $http := ternary .Values.service.httpPort -1 .Values.http.enabled -}}
{{- $managed := dict "host" "0.0.0.0" "port" .Values.service.port "metrics_port" .Values.service.metricsPort "http_port" $http "data_dir" "/data" -}}
{{- $config := merge $managed (deepCopy .Values.config) -}}
{{- range $key := keys $config | sortAlpha }}
{{- $value := get $config $key }}
{{- if or (kindIs "float64" $value) (kindIs "int64" $value) (kindIs "int" $value) }}
{{ $key }} = {{ if eq (float64 $value) (floor $value) }}{{ int64 $value }}{{ else }}{{ $value }}{{ end }}
{{- else }}
{{ $key }} = {{ toJson $value }}
{{- end }}
{{- end }}
{{- end -}}

{{/* Several pods need the shared adapter store: without it an adapter registered on one pod is
NOT_FOUND on the others. */}}
{{- define "ortmux.validate" -}}
{{- $many := or (gt (int .Values.replicaCount) 1) (and .Values.autoscaling.enabled (gt (int .Values.autoscaling.maxReplicas) 1)) -}}
{{- if and $many (not .Values.config.adapter_store) -}}
{{- fail "ortmux: replicaCount > 1 or autoscaling needs a shared adapter store: set config.adapter_store=s3://BUCKET/PREFIX (and adapterStore.* for its endpoint and credentials); without it an adapter registered on one pod is NOT_FOUND on the others" -}}
{{- end -}}
{{- if not (has .Values.adapterCache.type (list "emptyDir" "ephemeral")) -}}
{{- fail (printf "ortmux: adapterCache.type must be emptyDir or ephemeral, got %q" .Values.adapterCache.type) -}}
{{- end -}}
{{- end -}}

{{- define "ortmux.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- .Values.serviceAccount.name | default (include "ortmux.fullname" .) -}}
{{- else -}}
{{- .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}
