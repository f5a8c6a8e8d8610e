{{/* Names, labels and the settings every workload shares. */}}

{{- define "orchestrator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "orchestrator.fullname" -}}
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

{{- define "orchestrator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "orchestrator.labels" -}}
helm.sh/chart: {{ include "orchestrator.chart" . }}
app.kubernetes.io/name: {{ include "orchestrator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: {{ include "orchestrator.name" . }}
{{- end -}}

{{/* Labels of pod templates besides their selector labels. */}}
{{- define "orchestrator.podLabels" -}}
helm.sh/chart: {{ include "orchestrator.chart" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: {{ include "orchestrator.name" . }}
{{- end -}}

{{/* Selector of the control-plane pods. */}}
{{- define "orchestrator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "orchestrator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: control-plane
{{- end -}}

{{/* Selector of one backend's pods: (dict "root" $ "backend" $b). */}}
{{- define "orchestrator.backendSelectorLabels" -}}
app.kubernetes.io/name: {{ include "orchestrator.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: backend
orchestrator.dev/backend: {{ .backend.name }}
{{- end -}}

{{/* Selector of every backend pod of the release (PodMonitor, NetworkPolicy). */}}
{{- define "orchestrator.allBackendsSelectorLabels" -}}
app.kubernetes.io/name: {{ include "orchestrator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: backend
{{- end -}}

{{/* The label a pod carries to be admitted by the NetworkPolicy as an API client. */}}
{{- define "orchestrator.clientLabel" -}}
{{ include "orchestrator.fullname" . }}-client: "true"
{{- end -}}

{{- define "orchestrator.backendFullname" -}}
{{- printf "%s-%s" (include "orchestrator.fullname" .root) .backend.name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "orchestrator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "orchestrator.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "orchestrator.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}
{{- end -}}

{{/* Which database: external | bundled | sqlite. */}}
{{- define "orchestrator.databaseMode" -}}
{{- if or .Values.database.url .Values.database.existingSecret -}}external
{{- else if .Values.postgresql.enabled -}}bundled
{{- else -}}sqlite
{{- end -}}
{{- end -}}

{{/* Which Redis: external | bundled | none. */}}
{{- define "orchestrator.redisMode" -}}
{{- if or .Values.redis.url .Values.redis.existingSecret -}}external
{{- else if .Values.bundledRedis.enabled -}}bundled
{{- else -}}none
{{- end -}}
{{- end -}}

{{- define "orchestrator.postgresqlSecretName" -}}
{{- default (printf "%s-postgresql" (include "orchestrator.fullname" .)) .Values.postgresql.existingSecret -}}
{{- end -}}

{{/* Short name of the chart-made Secret (inline API keys, external URLs given inline). */}}
{{- define "orchestrator.secretName" -}}
{{- printf "%s-secrets" (include "orchestrator.fullname" .) -}}
{{- end -}}

{{/* ORCH_BACKENDS as a JSON list: one entry per in-cluster backend pod, then the external ones. */}}
{{- define "orchestrator.backendsJson" -}}
{{- $entries := list -}}
{{- range $b := .Values.backends -}}
{{- $full := include "orchestrator.backendFullname" (dict "root" $ "backend" $b) -}}
{{- $port := int (default 30000 $b.port) -}}
{{- range $i := until (int (default 1 $b.replicas)) -}}
{{- $url := printf "http://%s-%d.%s.%s.svc:%d" $full $i $full $.Release.Namespace $port -}}
{{- $entry := dict "name" (printf "%s-%d" $b.name $i) "kind" "sglang" "url" $url -}}
{{- if $b.servedModelName -}}{{- $_ := set $entry "model" $b.servedModelName -}}{{- end -}}
{{- $entries = append $entries $entry -}}
{{- end -}}
{{- end -}}
{{- range $e := .Values.externalBackends -}}
{{- $entries = append $entries $e -}}
{{- end -}}
{{- toJson $entries -}}
{{- end -}}

{{/* ORCH_SANDBOX_KUBERNETES as JSON. */}}
{{- define "orchestrator.sandboxKubernetesJson" -}}
{{- $k := .Values.sandbox.kubernetes -}}
{{- $cfg := dict "namespace" (default .Release.Namespace $k.namespace) "image" (include "orchestrator.image" .) "resources" $k.resources "workspace_size" $k.workspaceSize -}}
{{- if $k.runtimeClassName -}}{{- $_ := set $cfg "runtime_class_name" $k.runtimeClassName -}}{{- end -}}
{{- if $k.nodeSelector -}}{{- $_ := set $cfg "node_selector" $k.nodeSelector -}}{{- end -}}
{{- toJson (merge $cfg $k.extra) -}}
{{- end -}}

{{/*
Environment of every control-plane container (server, migration job): the database and
Redis URLs from their Secrets, the API keys. The rest comes from the ConfigMap.
*/}}
{{- define "orchestrator.secretEnv" -}}
{{- $db := include "orchestrator.databaseMode" . -}}
{{- if eq $db "external" }}
- name: ORCH_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ default (include "orchestrator.secretName" .) .Values.database.existingSecret }}
      key: {{ ternary .Values.database.existingSecretKey "database-url" (not (empty .Values.database.existingSecret)) }}
{{- else if eq $db "bundled" }}
- name: POSTGRES_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "orchestrator.postgresqlSecretName" . }}
      key: password
- name: ORCH_DATABASE_URL
  value: {{ printf "postgresql+asyncpg://%s:$(POSTGRES_PASSWORD)@%s-postgresql:5432/%s" .Values.postgresql.username (include "orchestrator.fullname" .) .Values.postgresql.database | quote }}
{{- end }}
{{- $redis := include "orchestrator.redisMode" . -}}
{{- if eq $redis "external" }}
- name: ORCH_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ default (include "orchestrator.secretName" .) .Values.redis.existingSecret }}
      key: {{ ternary .Values.redis.existingSecretKey "redis-url" (not (empty .Values.redis.existingSecret)) }}
{{- else if eq $redis "bundled" }}
- name: ORCH_REDIS_URL
  value: {{ printf "redis://%s-redis:6379/0" (include "orchestrator.fullname" .) | quote }}
{{- end }}
{{- if or .Values.auth.existingSecret .Values.auth.apiKeys }}
- name: ORCH_API_KEYS
  valueFrom:
    secretKeyRef:
      name: {{ default (include "orchestrator.secretName" .) .Values.auth.existingSecret }}
      key: {{ ternary .Values.auth.existingSecretKey "api-keys" (not (empty .Values.auth.existingSecret)) }}
{{- end }}
{{- if .Values.backendsSecret.name }}
- name: ORCH_BACKENDS
  valueFrom:
    secretKeyRef:
      name: {{ .Values.backendsSecret.name }}
      key: {{ .Values.backendsSecret.key }}
{{- end }}
{{- end -}}

{{/*
Fail fast on settings that contradict each other (the schema checks each value alone).
Included by the ConfigMap, so every render runs it.
*/}}
{{- define "orchestrator.validate" -}}
{{- $db := include "orchestrator.databaseMode" . -}}
{{- $redis := include "orchestrator.redisMode" . -}}
{{- $multi := or (gt (int .Values.replicaCount) 1) .Values.autoscaling.enabled -}}
{{- if and $multi (eq $db "sqlite") -}}
{{- fail "several control-plane replicas (replicaCount > 1 or autoscaling.enabled) need PostgreSQL: set database.url / database.existingSecret or postgresql.enabled=true (SQLite is one process's database)" -}}
{{- end -}}
{{- if and $multi (eq $redis "none") -}}
{{- fail "several control-plane replicas (replicaCount > 1 or autoscaling.enabled) need Redis: set redis.url / redis.existingSecret or bundledRedis.enabled=true (the in-process event bus does not cross pods)" -}}
{{- end -}}
{{- if and .Values.autoscaling.enabled (gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) -}}
{{- fail (printf "autoscaling.minReplicas (%d) is above autoscaling.maxReplicas (%d)" (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) -}}
{{- end -}}
{{- if and .Values.database.url .Values.database.existingSecret -}}
{{- fail "set database.url or database.existingSecret, not both" -}}
{{- end -}}
{{- if and .Values.redis.url .Values.redis.existingSecret -}}
{{- fail "set redis.url or redis.existingSecret, not both" -}}
{{- end -}}
{{- if and (ne $db "bundled") .Values.postgresql.enabled -}}
{{- fail "postgresql.enabled=true and an external database (database.url / database.existingSecret) are both set: pick one" -}}
{{- end -}}
{{- if and (ne $redis "bundled") .Values.bundledRedis.enabled -}}
{{- fail "bundledRedis.enabled=true and an external Redis (redis.url / redis.existingSecret) are both set: pick one" -}}
{{- end -}}
{{- if and .Values.auth.existingSecret .Values.auth.apiKeys -}}
{{- fail "set auth.existingSecret or auth.apiKeys, not both" -}}
{{- end -}}
{{- if and .Values.persistence.enabled $multi (has "ReadWriteOnce" .Values.persistence.accessModes) -}}
{{- fail "persistence.enabled with a ReadWriteOnce volume cannot be shared by several replicas: turn persistence off (PostgreSQL holds the state) or use ReadWriteMany" -}}
{{- end -}}
{{- if and .Values.podDisruptionBudget.minAvailable .Values.podDisruptionBudget.maxUnavailable -}}
{{- fail "podDisruptionBudget: set minAvailable or maxUnavailable, not both" -}}
{{- end -}}
{{- if and (eq .Values.sandbox.kind "kubernetes") (not .Values.serviceAccount.automount) -}}
{{- fail "sandbox.kind=kubernetes reads the service account token: serviceAccount.automount must be true" -}}
{{- end -}}
{{- $names := dict -}}
{{- range $b := .Values.backends -}}
{{- if hasKey $names $b.name -}}
{{- fail (printf "backends: the name %q is used twice" $b.name) -}}
{{- end -}}
{{- $_ := set $names $b.name true -}}
{{- if and $.Values.metrics.podMonitor.enabled (eq $b.kind "sglang") (eq (toString $b.enableMetrics) "false") -}}
{{- fail (printf "backends[%s]: metrics.podMonitor.enabled scrapes /metrics, which SGLang serves only with enableMetrics=true" $b.name) -}}
{{- end -}}
{{- if and (eq $b.kind "sglang") (not $b.model) -}}
{{- fail (printf "backends[%s]: an sglang backend needs a model (a Hugging Face id or a path in its model cache)" $b.name) -}}
{{- end -}}
{{- if and (eq $b.kind "sim") (eq (toString $.Values.config.schedulerPolicy) "program") (ne (toString $b.rankKv) "false") (eq (toString $b.enablePriorityScheduling) "true") -}}
{{- fail (printf "backends[%s]: the simulator's priority queue (largest first) would read the program policy's eviction ranks as urgency: drop enablePriorityScheduling or set rankKv=false" $b.name) -}}
{{- end -}}
{{- end -}}
{{- range $e := .Values.externalBackends -}}
{{- if hasKey $names $e.name -}}
{{- fail (printf "externalBackends: the name %q is also an in-cluster backend's" $e.name) -}}
{{- end -}}
{{- end -}}
{{- end -}}
