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
{{- $managed := dict "host" "0.0.0.0" "port" .Values.service.port "metrics_port" .Values.service.metricsPort "data_dir" "/data" -}}
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
