{{/* Chart name, truncated to 63 characters (DNS label). */}}
{{- define "hami.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Fully qualified base name: the release name, with the chart name unless it already contains it.
     Component objects append "-agent", "-scheduler", ... (so it is cut at 40 characters). */}}
{{- define "hami.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "hami.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Common labels; call with (dict "root" $ "component" "agent"). */}}
{{- define "hami.labels" -}}
helm.sh/chart: {{ include "hami.chart" .root }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: hami
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
{{ include "hami.selectorLabels" . }}
{{- with .root.Values.global.labels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Selector labels; call with (dict "root" $ "component" "agent"). */}}
{{- define "hami.selectorLabels" -}}
app.kubernetes.io/name: {{ include "hami.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Object names. */}}
{{- define "hami.agent.name" -}}{{ include "hami.fullname" . }}-agent{{- end -}}
{{- define "hami.scheduler.name" -}}{{ include "hami.fullname" . }}-scheduler{{- end -}}
{{- define "hami.deviceConfig.name" -}}{{ include "hami.fullname" . }}-device-config{{- end -}}
{{- define "hami.webhook.name" -}}{{ include "hami.fullname" . }}-webhook{{- end -}}
{{- define "hami.certgen.name" -}}{{ include "hami.fullname" . }}-certgen{{- end -}}
{{- define "hami.decisionKey.secretName" -}}{{ default (printf "%s-decision-key" (include "hami.fullname" .)) .Values.decisionKey.existingSecret }}{{- end -}}
{{- define "hami.tls.secretName" -}}{{ include "hami.fullname" . }}-scheduler-tls{{- end -}}

{{/* An image reference; call with (dict "root" $ "image" .Values.agent.image "hami" true).
     hami images fall back to global.imageRegistry and global.imageTag / appVersion. */}}
{{- define "hami.image" -}}
{{- $registry := .image.registry -}}
{{- $tag := .image.tag -}}
{{- if .hami -}}
{{- $registry = default .root.Values.global.imageRegistry $registry -}}
{{- $tag = default (default .root.Chart.AppVersion .root.Values.global.imageTag) $tag -}}
{{- end -}}
{{- if $registry -}}
{{- printf "%s/%s:%s" (trimSuffix "/" $registry) .image.repository $tag -}}
{{- else -}}
{{- printf "%s:%s" .image.repository $tag -}}
{{- end -}}
{{- end -}}

{{/* The kube-scheduler image tag: the value, else the cluster's vX.Y.Z (build suffixes such as
     "-eks-..." or "+k3s1" dropped: they are not upstream image tags). */}}
{{- define "hami.kubeScheduler.tag" -}}
{{- if .Values.scheduler.kubeScheduler.image.tag -}}
{{- .Values.scheduler.kubeScheduler.image.tag -}}
{{- else -}}
{{- $v := regexFind "^v?[0-9]+\\.[0-9]+\\.[0-9]+" .Capabilities.KubeVersion.Version -}}
{{- if not $v -}}
{{- fail (printf "cannot derive a kube-scheduler image tag from Kubernetes version %q: set scheduler.kubeScheduler.image.tag" .Capabilities.KubeVersion.Version) -}}
{{- end -}}
{{- printf "v%s" (trimPrefix "v" $v) -}}
{{- end -}}
{{- end -}}

{{/* The HAMi resource names (devices.nvidia), as a list. */}}
{{- define "hami.resourceNames" -}}
{{- $n := .Values.devices.nvidia -}}
{{- $names := list $n.resourceCountName $n.resourceMemoryName $n.resourceMemoryPercentageName $n.resourceCoreName $n.resourcePriorityName | compact | uniq -}}
{{- toJson $names -}}
{{- end -}}

{{/* Whether the extender serves TLS: it shares the webhook's certificate. */}}
{{- define "hami.tls.enabled" -}}
{{- if and .Values.scheduler.enabled .Values.scheduler.admissionWebhook.enabled -}}true{{- end -}}
{{- end -}}

{{/* File names in the TLS Secret: kube-webhook-certgen writes ca/cert/key, cert-manager ca.crt/tls.crt/tls.key. */}}
{{- define "hami.tls.caFile" -}}{{ if .Values.scheduler.admissionWebhook.certManager.enabled }}ca.crt{{ else }}ca{{ end }}{{- end -}}
{{- define "hami.tls.certFile" -}}{{ if .Values.scheduler.admissionWebhook.certManager.enabled }}tls.crt{{ else }}cert{{ end }}{{- end -}}
{{- define "hami.tls.keyFile" -}}{{ if .Values.scheduler.admissionWebhook.certManager.enabled }}tls.key{{ else }}key{{ end }}{{- end -}}

{{/* DNS names of the scheduler Service (certificate SANs). */}}
{{- define "hami.scheduler.dnsNames" -}}
{{- $svc := include "hami.scheduler.name" . -}}
{{- $ns := .Release.Namespace -}}
{{- toJson (list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.cluster.local" $svc $ns)) -}}
{{- end -}}

{{/* The kube-scheduler `extenders` list (kubescheduler.config.k8s.io/v1). Call with (dict "root" $ "inPod" bool):
     inPod = the kube-scheduler container of this chart (loopback); else an external scheduler (the Service). */}}
{{- define "hami.extenders" -}}
{{- $root := .root -}}
{{- $e := $root.Values.scheduler.extenderConfig -}}
{{- $tls := include "hami.tls.enabled" $root -}}
{{- $scheme := ternary "https" "http" (eq $tls "true") -}}
{{- $host := ternary (printf "127.0.0.1:%v" $root.Values.scheduler.extender.port) (printf "%s.%s.svc:%v" (include "hami.scheduler.name" $root) $root.Release.Namespace $root.Values.scheduler.service.port) .inPod -}}
- urlPrefix: {{ printf "%s://%s" $scheme $host | quote }}
  filterVerb: {{ $e.filterVerb | quote }}
  {{- with $e.prioritizeVerb }}
  prioritizeVerb: {{ . | quote }}
  {{- end }}
  weight: {{ int $e.weight }}
  {{- with $e.bindVerb }}
  bindVerb: {{ . | quote }}
  {{- end }}
  enableHTTPS: {{ eq $tls "true" }}
  {{- if eq $tls "true" }}
  tlsConfig:
    # The extender's certificate is issued for the Service's DNS names.
    serverName: {{ printf "%s.%s.svc" (include "hami.scheduler.name" $root) $root.Release.Namespace | quote }}
    {{- if .inPod }}
    caFile: {{ printf "/etc/hami/tls/%s" (include "hami.tls.caFile" $root) | quote }}
    {{- else }}
    # caData: base64 of key "{{ include "hami.tls.caFile" $root }}" of Secret {{ $root.Release.Namespace }}/{{ include "hami.tls.secretName" $root }}
    {{- end }}
  {{- end }}
  httpTimeout: {{ $e.httpTimeout | quote }}
  nodeCacheCapable: {{ $e.nodeCacheCapable }}
  ignorable: {{ $e.ignorable }}
  managedResources:
    {{- range (include "hami.resourceNames" $root | fromJsonArray) }}
    - name: {{ . | quote }}
      ignoredByScheduler: true
    {{- end }}
{{- end -}}

{{/* Validation of values that no schema can express. */}}
{{- define "hami.validate" -}}
{{- if .Values.scheduler.enabled -}}
{{- $c := .Values.scheduler.extender.config -}}
{{- if and (hasKey $c "nodeSchedulerPolicy") (not (has $c.nodeSchedulerPolicy (list "binpack" "spread"))) -}}
{{- fail (printf "scheduler.extender.config.nodeSchedulerPolicy: %q is not binpack or spread" $c.nodeSchedulerPolicy) -}}
{{- end -}}
{{- if hasKey $c "gpuSchedulerPolicy" -}}
{{- range (splitList "," $c.gpuSchedulerPolicy) -}}
{{- if not (has (trim .) (list "binpack" "spread" "topology-aware" "mutex" "numa")) -}}
{{- fail (printf "scheduler.extender.config.gpuSchedulerPolicy: %q is not binpack, spread, topology-aware, mutex or numa" .) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if and .Values.scheduler.extenderConfig.prioritizeVerb (le (int .Values.scheduler.extenderConfig.weight) 0) -}}
{{- fail "scheduler.extenderConfig.weight must be > 0 when prioritizeVerb is set" -}}
{{- end -}}
{{- if and (gt (int .Values.scheduler.replicas) 1) (not .Values.scheduler.leaderElect) -}}
{{- fail "scheduler.replicas > 1 needs scheduler.leaderElect" -}}
{{- end -}}
{{- end -}}
{{- end -}}
