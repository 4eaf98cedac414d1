{{/*
Cross-field checks that a JSON schema cannot express; rendering stops with a message that
names the values to fix. Included once, at the top of gateway-configmap.yaml (always rendered).
*/}}
{{- define "fashionserve.validate" -}}
{{- $gw := .Values.gateway -}}
{{- if le (int $gw.terminationGracePeriodSeconds) (add $gw.preStopSleepSeconds $gw.shutdownGraceSeconds | int) -}}
{{- fail (printf "gateway.terminationGracePeriodSeconds (%v) must exceed gateway.preStopSleepSeconds + gateway.shutdownGraceSeconds (%v + %v), or Kubernetes kills requests still draining" $gw.terminationGracePeriodSeconds $gw.preStopSleepSeconds $gw.shutdownGraceSeconds) -}}
{{- end -}}
{{- if le (int .Values.triton.terminationGracePeriodSeconds) (int .Values.triton.exitTimeoutSeconds) -}}
{{- fail (printf "triton.terminationGracePeriodSeconds (%v) must exceed triton.exitTimeoutSeconds (%v)" .Values.triton.terminationGracePeriodSeconds .Values.triton.exitTimeoutSeconds) -}}
{{- end -}}
{{- if and .Values.engineBuild.enabled (ne .Values.modelRepository.source "pvc") -}}
{{- fail "engineBuild writes engines into the repository PVC: it needs modelRepository.source=pvc" -}}
{{- end -}}
{{- if and .Values.engineBuild.enabled .Values.engineBuild.hook (not .Values.modelRepository.pvc.existingClaim) -}}
{{- fail "engineBuild.hook runs before the chart creates its PVC: set modelRepository.pvc.existingClaim (or engineBuild.hook=false)" -}}
{{- end -}}
{{- if and .Values.metrics.serviceMonitor.enabled .Values.networkPolicy.enabled (not .Values.networkPolicy.metricsFrom) -}}
{{- fail "metrics.serviceMonitor.enabled with networkPolicy.enabled: set networkPolicy.metricsFrom to the Prometheus pods, or the NetworkPolicy blocks the scrapes" -}}
{{- end -}}
{{- if and (eq .Values.modelRepository.source "objectStorage") (not .Values.modelRepository.objectStorage.url) -}}
{{- fail "modelRepository.source=objectStorage needs modelRepository.objectStorage.url (s3://... or gs://...)" -}}
{{- end -}}
{{- $pvc := .Values.modelRepository.pvc -}}
{{- if and (eq .Values.modelRepository.source "pvc") (not $pvc.create) (not $pvc.existingClaim) -}}
{{- fail "modelRepository.source=pvc needs modelRepository.pvc.create=true or modelRepository.pvc.existingClaim" -}}
{{- end -}}
{{- if and $gw.auth.enabled (include "fashionserve.gateway.jwksKey" .) (not (and $gw.config.jwt_issuer $gw.config.jwt_audience)) -}}
{{- fail "a JWKS is configured (gateway.auth.jwks or existingSecret.jwksKey): set gateway.config.jwt_issuer and gateway.config.jwt_audience, the claims every token must carry" -}}
{{- end -}}
{{- if and $gw.tls.enabled (not $gw.tls.secretName) -}}
{{- fail "gateway.tls.enabled needs gateway.tls.secretName (a kubernetes.io/tls Secret with tls.crt and tls.key, and ca.crt for requireClientCert)" -}}
{{- end -}}
{{- if $gw.tls.enabled -}}
{{- range $name := list "startupProbe" "readinessProbe" "livenessProbe" -}}
{{- if eq (index $gw $name).type "grpc" -}}
{{- fail (printf "gateway.tls.enabled: the kubelet's gRPC probes cannot speak TLS; set gateway.%s.type=tcpSocket" $name) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- $bulk := .Values.bulk -}}
{{- if and $bulk.enabled (not (and $bulk.input.source $bulk.output.existingClaim $bulk.output.directory $bulk.apiKey.secretName)) -}}
{{- fail "bulk.enabled needs bulk.input.source, bulk.output.existingClaim, bulk.output.directory (the run's directory, e.g. the day) and bulk.apiKey.secretName" -}}
{{- end -}}
{{- if and $bulk.enabled (gt (int $bulk.parallelism) (int $bulk.shards)) -}}
{{- fail (printf "bulk.parallelism (%v) is more than bulk.shards (%v): the extra pods would have nothing to do" $bulk.parallelism $bulk.shards) -}}
{{- end -}}
{{- if and .Values.modelRepository.objectStorage.gcsCredentialsKey (not .Values.modelRepository.objectStorage.existingSecret) -}}
{{- fail "modelRepository.objectStorage.gcsCredentialsKey names a key of modelRepository.objectStorage.existingSecret, which is empty" -}}
{{- end -}}
{{- end -}}
