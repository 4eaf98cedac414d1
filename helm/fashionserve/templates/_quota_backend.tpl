{{/*
The shared quota backend (quotaBackend.*): its names, the gateway settings it implies, and
the checks a JSON schema cannot express.
*/}}
{{- define "fashionserve.quotaBackend.fullname" -}}
{{- printf "%s-quota" (include "fashionserve.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The Secret holding the backend's password ("" when there is none). */}}
{{- define "fashionserve.quotaBackend.passwordSecret" -}}
{{- if eq .Values.quotaBackend.mode "deploy" -}}
{{- include "fashionserve.quotaBackend.fullname" . -}}
{{- else if eq .Values.quotaBackend.mode "external" -}}
{{- .Values.quotaBackend.external.passwordSecret.name -}}
{{- end -}}
{{- end -}}

{{- define "fashionserve.quotaBackend.passwordKey" -}}
{{- if eq .Values.quotaBackend.mode "deploy" -}}
password
{{- else -}}
{{- .Values.quotaBackend.external.passwordSecret.key -}}
{{- end -}}
{{- end -}}

{{/* Where the gateway mounts the password. */}}
{{- define "fashionserve.quotaBackend.mountPath" -}}
/etc/fashionserve/quota-backend
{{- end -}}

{{/* The backend's port as the gateway reaches it. */}}
{{- define "fashionserve.quotaBackend.port" -}}
{{- if eq .Values.quotaBackend.mode "deploy" -}}
{{- .Values.quotaBackend.deploy.port -}}
{{- else -}}
{{- $host := (urlParse .Values.quotaBackend.external.url).host -}}
{{- if contains ":" $host -}}{{ splitList ":" $host | last | int }}{{- else -}}6379{{- end -}}
{{- end -}}
{{- end -}}

{{/* The gateway's quota_backend_* settings (YAML; empty with mode none). */}}
{{- define "fashionserve.quotaBackend.settings" -}}
{{- $qb := .Values.quotaBackend -}}
{{- if ne $qb.mode "none" -}}
{{- $cfg := dict "quota_backend_failure_policy" $qb.failurePolicy "quota_backend_timeout_seconds" $qb.timeoutSeconds "quota_backend_lease_seconds" $qb.leaseSeconds -}}
{{- if eq $qb.mode "deploy" -}}
{{- $_ := set $cfg "quota_backend_url" (printf "redis://%s:%d" (include "fashionserve.quotaBackend.fullname" .) (int $qb.deploy.port)) -}}
{{- else -}}
{{- $_ := set $cfg "quota_backend_url" $qb.external.url -}}
{{- end -}}
{{- if include "fashionserve.quotaBackend.passwordSecret" . -}}
{{- $_ := set $cfg "quota_backend_password_file" (printf "%s/%s" (include "fashionserve.quotaBackend.mountPath" .) (include "fashionserve.quotaBackend.passwordKey" .)) -}}
{{- end -}}
{{- toYaml $cfg -}}
{{- end -}}
{{- end -}}

{{- define "fashionserve.quotaBackend.validate" -}}
{{- $qb := .Values.quotaBackend -}}
{{- if and (eq $qb.mode "external") (not $qb.external.url) -}}
{{- fail "quotaBackend.mode=external needs quotaBackend.external.url (redis://host:port or rediss://host:port)" -}}
{{- end -}}
{{- if and (eq $qb.mode "external") .Values.networkPolicy.enabled (not $qb.external.to) -}}
{{- fail "quotaBackend.mode=external with networkPolicy.enabled: set quotaBackend.external.to to the server's peers (e.g. an ipBlock), or the NetworkPolicy blocks the gateway's calls to it" -}}
{{- end -}}
{{- end -}}
