{{/*
Helpers shared by every template. All names are namespaced with "fashionserve." so that a
parent chart's helpers cannot collide with them.
*/}}

{{/* The chart name, overridable with nameOverride. */}}
{{- define "fashionserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
The fully qualified app name, used as the prefix of every resource name. Truncated to 63
characters (DNS label limit); the release name is not repeated when it already contains the
chart name.
*/}}
{{- define "fashionserve.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Name and version, as used by the helm.sh/chart label. */}}
{{- define "fashionserve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Per-component resource names: <fullname>-gateway, <fullname>-triton, ... */}}
{{- define "fashionserve.gateway.fullname" -}}
{{- printf "%s-gateway" (include "fashionserve.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "fashionserve.triton.fullname" -}}
{{- printf "%s-triton" (include "fashionserve.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Selector labels: only labels that never change over a release's life. name and instance
identify the release; component tells the gateway's pods from Triton's pods, without which
the gateway Service would also select Triton pods and the two Deployments would overlap.
Usage: include "fashionserve.selectorLabels" (dict "ctx" $ "component" "gateway")
*/}}
{{- define "fashionserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "fashionserve.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/*
The standard labels on every resource (Kubernetes recommended labels plus helm.sh/chart).
Usage: include "fashionserve.labels" (dict "ctx" $ "component" "gateway")
*/}}
{{- define "fashionserve.labels" -}}
helm.sh/chart: {{ include "fashionserve.chart" .ctx }}
{{ include "fashionserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: fashionserve
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/*
An image reference from {registry, repository, tag, digest}. A tag is always present (the
schema refuses "latest"); the digest, when given, pins the exact bytes.
Usage: include "fashionserve.image" (dict "image" .Values.gateway.image "default" .Chart.AppVersion)
*/}}
{{- define "fashionserve.image" -}}
{{- $tag := default .default .image.tag | toString -}}
{{- $ref := printf "%s:%s" .image.repository $tag -}}
{{- if .image.registry -}}
{{- $ref = printf "%s/%s" .image.registry $ref -}}
{{- end -}}
{{- if .image.digest -}}
{{- $ref = printf "%s@%s" $ref .image.digest -}}
{{- end -}}
{{- $ref -}}
{{- end -}}

{{/* ServiceAccount names. */}}
{{- define "fashionserve.gateway.serviceAccountName" -}}
{{- if .Values.gateway.serviceAccount.create -}}
{{- default (include "fashionserve.gateway.fullname" .) .Values.gateway.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.gateway.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "fashionserve.triton.serviceAccountName" -}}
{{- if .Values.triton.serviceAccount.create -}}
{{- default (include "fashionserve.triton.fullname" .) .Values.triton.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.triton.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The Secret holding the gateway's API-key hashes and JWKS (chart-made or existing). */}}
{{- define "fashionserve.gateway.secretName" -}}
{{- default (include "fashionserve.gateway.fullname" .) .Values.gateway.auth.existingSecret.name -}}
{{- end -}}

{{/* Keys of that Secret. */}}
{{- define "fashionserve.gateway.apiKeysKey" -}}
{{- if .Values.gateway.auth.existingSecret.name -}}
{{- .Values.gateway.auth.existingSecret.apiKeysKey -}}
{{- else -}}
api_keys.yaml
{{- end -}}
{{- end -}}

{{- define "fashionserve.gateway.jwksKey" -}}
{{- if .Values.gateway.auth.existingSecret.name -}}
{{- .Values.gateway.auth.existingSecret.jwksKey -}}
{{- else if .Values.gateway.auth.jwks -}}
jwks.json
{{- end -}}
{{- end -}}

{{/*
Triton's address as the gateway dials it: the headless Service's DNS name, which resolves to
one address per ready Triton pod, so a gRPC client with round_robin spreads batches over them.
*/}}
{{- define "fashionserve.triton.grpcAddress" -}}
{{- printf "%s.%s.svc.%s:%d" (include "fashionserve.triton.fullname" .) .Release.Namespace .Values.clusterDomain (int .Values.triton.ports.grpc) -}}
{{- end -}}

{{/* The gateway's TLS Secret: the one named, or the one the chart's Certificate writes. */}}
{{- define "fashionserve.gateway.tlsSecretName" -}}
{{- default (printf "%s-tls" (include "fashionserve.gateway.fullname" .)) .Values.gateway.tls.secretName -}}
{{- end -}}

{{/* The Secret holding the value of Triton's admin header (existing, or the chart's). */}}
{{- define "fashionserve.triton.adminSecretName" -}}
{{- default (printf "%s-admin" (include "fashionserve.triton.fullname" .)) .Values.triton.restrictedApis.existingSecret -}}
{{- end -}}

{{/* The PVC that holds the model repository. */}}
{{- define "fashionserve.modelRepository.claimName" -}}
{{- default (printf "%s-models" (include "fashionserve.fullname" .)) .Values.modelRepository.pvc.existingClaim -}}
{{- end -}}

{{/* The --model-repository argument: a path in the pod or an object-storage URL. */}}
{{- define "fashionserve.modelRepository.location" -}}
{{- if eq .Values.modelRepository.source "objectStorage" -}}
{{- required "modelRepository.objectStorage.url is required when modelRepository.source is objectStorage" .Values.modelRepository.objectStorage.url -}}
{{- else -}}
{{- printf "%s/%s" (.Values.modelRepository.pvc.mountPath | trimSuffix "/") (.Values.modelRepository.pvc.subPath | trimPrefix "/") | trimSuffix "/" -}}
{{- end -}}
{{- end -}}

{{/*
The gateway's config file (gateway.yaml): the tunables from gateway.config plus the fields the
chart owns because they must agree with other resources (ports, Triton's address, the Secret's
mount paths, the grace period).
*/}}
{{- define "fashionserve.gateway.configFile" -}}
{{- $cfg := deepCopy .Values.gateway.config -}}
{{- /* null: the gateway's own default (for some, derived from its memory or CPUs). */ -}}
{{- range $key, $value := .Values.gateway.config -}}
{{- if kindIs "invalid" $value -}}
{{- $_ := unset $cfg $key -}}
{{- end -}}
{{- end -}}
{{- $_ := set $cfg "memory_limit_bytes" (include "fashionserve.bytes" .Values.gateway.resources.limits.memory | int64) -}}
{{- $_ = set $cfg "listen_address" (printf "0.0.0.0:%d" (int .Values.gateway.ports.grpc)) -}}
{{- $_ = set $cfg "health_port" (int .Values.gateway.ports.health) -}}
{{- /* dns:///: every ready Triton pod behind the headless Service is an endpoint. */ -}}
{{- $_ = set $cfg "triton_urls" (list (printf "dns:///%s" (include "fashionserve.triton.grpcAddress" .))) -}}
{{- if .Values.gateway.metrics.enabled -}}
{{- $_ = set $cfg "metrics_port" (int .Values.gateway.ports.metrics) -}}
{{- end -}}
{{- $_ = set $cfg "shutdown_grace_seconds" .Values.gateway.shutdownGraceSeconds -}}
{{- $_ = set $cfg "auth_enabled" .Values.gateway.auth.enabled -}}
{{- if .Values.gateway.auth.enabled -}}
{{- $_ = set $cfg "api_keys_file" (printf "%s/%s" .Values.gateway.auth.mountPath (include "fashionserve.gateway.apiKeysKey" .)) -}}
{{- $jwksKey := include "fashionserve.gateway.jwksKey" . -}}
{{- if $jwksKey -}}
{{- $_ = set $cfg "jwks_file" (printf "%s/%s" .Values.gateway.auth.mountPath $jwksKey) -}}
{{- end -}}
{{- end -}}
{{- with .Values.gateway.tls -}}
{{- if .enabled -}}
{{- $_ = set $cfg "tls_cert_file" (printf "%s/tls.crt" .mountPath) -}}
{{- $_ = set $cfg "tls_key_file" (printf "%s/tls.key" .mountPath) -}}
{{- if .requireClientCert -}}
{{- $_ = set $cfg "tls_client_ca_file" (printf "%s/ca.crt" .mountPath) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- $_ = merge $cfg (include "fashionserve.quotaBackend.settings" . | fromYaml) -}}
{{- toYaml $cfg -}}
{{- end -}}

{{/*
A Kubernetes memory quantity ("2Gi", "512Mi", "1G", "1073741824") in bytes.
Usage: include "fashionserve.bytes" .Values.gateway.resources.limits.memory | int64
*/}}
{{- define "fashionserve.bytes" -}}
{{- $quantity := toString . -}}
{{- $number := $quantity -}}
{{- $unit := 1 -}}
{{- range $suffix, $size := dict "Ki" 1024 "Mi" 1048576 "Gi" 1073741824 "Ti" 1099511627776 "k" 1000 "M" 1000000 "G" 1000000000 "T" 1000000000000 -}}
{{- if hasSuffix $suffix $quantity -}}
{{- $number = trimSuffix $suffix $quantity -}}
{{- $unit = $size -}}
{{- end -}}
{{- end -}}
{{- mulf (float64 $number) $unit | int64 -}}
{{- end -}}

{{/*
Container resources with the GPU count added to both requests and limits (for extended
resources Kubernetes requires the two to be equal).
Usage: include "fashionserve.gpuResources" (dict "resources" .Values.triton.resources "gpus" 1 "resourceName" "nvidia.com/gpu")
*/}}
{{- define "fashionserve.gpuResources" -}}
{{- $res := deepCopy .resources -}}
{{- if gt (int .gpus) 0 -}}
{{- $requests := default (dict) $res.requests -}}
{{- $limits := default (dict) $res.limits -}}
{{- $_ := set $requests .resourceName (int .gpus) -}}
{{- $_ = set $limits .resourceName (int .gpus) -}}
{{- $_ = set $res "requests" $requests -}}
{{- $_ = set $res "limits" $limits -}}
{{- end -}}
{{- toYaml $res -}}
{{- end -}}

{{/*
The egress rule for DNS lookups (networkPolicy.dnsTo, port 53 over UDP and TCP), shared by the
gateway's and Triton's NetworkPolicies.
*/}}
{{- define "fashionserve.networkPolicy.dnsRule" -}}
# DNS lookups (the gateway resolves Triton's headless Service; Triton an object store's name).
- to:
    {{- toYaml .Values.networkPolicy.dnsTo | nindent 4 }}
  ports:
    - port: 53
      protocol: UDP
    - port: 53
      protocol: TCP
{{- end -}}
