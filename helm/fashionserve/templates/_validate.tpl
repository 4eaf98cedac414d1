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
{{- if and $gw.tls.enabled (not $gw.tls.secretName) (not $gw.tls.certManager.enabled) -}}
{{- fail "gateway.tls.enabled (the default) needs gateway.tls.secretName (a kubernetes.io/tls Secret with tls.crt and tls.key, and ca.crt for requireClientCert) or gateway.tls.certManager.enabled with its issuerRef; gateway.tls.enabled=false only on a private test cluster" -}}
{{- end -}}
{{- if and $gw.tls.certManager.enabled (not $gw.tls.enabled) -}}
{{- fail "gateway.tls.certManager.enabled issues a certificate the gateway would not use: set gateway.tls.enabled=true" -}}
{{- end -}}
{{- if and $gw.tls.enabled $gw.tls.certManager.enabled (not $gw.tls.certManager.issuerRef.name) -}}
{{- fail "gateway.tls.certManager.enabled needs gateway.tls.certManager.issuerRef.name (the Issuer or ClusterIssuer that signs the certificate)" -}}
{{- end -}}
{{- /* The gateway's own rule (memory.CALLER_SHARE): received messages, and apart admitted
images, may each take half of its memory. Checked here too, so that a pod does not crash-loop. */ -}}
{{- $callerBudget := div (include "fashionserve.bytes" $gw.resources.limits.memory | int64) 2 -}}
{{- range $pair := list (list "max_concurrent_rpcs" "max_message_bytes") (list "max_images_in_flight" "max_image_bytes") -}}
{{- $count := index $gw.config (first $pair) -}}
{{- $size := index $gw.config (last $pair) -}}
{{- if and $count (gt (mul $count $size) $callerBudget) -}}
{{- fail (printf "gateway.config.%s x %s (%d x %d bytes) must fit half of gateway.resources.limits.memory (%v): lower one of them, raise the limit, or leave %s null to fit it" (first $pair) (last $pair) (int64 $count) (int64 $size) $gw.resources.limits.memory (first $pair)) -}}
{{- end -}}
{{- end -}}
{{- $np := .Values.networkPolicy -}}
{{- if and $np.enabled $gw.config.otlp_traces_endpoint (not $np.otlpTo) -}}
{{- fail "gateway.config.otlp_traces_endpoint with networkPolicy.enabled: set networkPolicy.otlpTo to the collector's pods, or the NetworkPolicy blocks the traces" -}}
{{- end -}}
{{- if and $np.enabled (eq .Values.modelRepository.source "objectStorage") (not $np.tritonEgress) -}}
{{- fail "modelRepository.source=objectStorage with networkPolicy.enabled: set networkPolicy.tritonEgress to let Triton reach the store, e.g. [{ports: [{port: 443, protocol: TCP}]}]" -}}
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
{{- include "fashionserve.quotaBackend.validate" . -}}
{{- end -}}
