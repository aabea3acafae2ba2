{{- define "mailrelay.labels" -}}
app.kubernetes.io/name: mailrelay
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "mailrelay.relaySelector" -}}
app.kubernetes.io/name: mailrelay
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: relay
{{- end -}}

{{- define "mailrelay.operatorSelector" -}}
app.kubernetes.io/name: mailrelay
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- /* repository@digest when a digest is set, else repository:tag (tag defaults to appVersion). */ -}}
{{- define "mailrelay.image" -}}
{{- if .digest -}}
{{- printf "%s@%s" .repository .digest -}}
{{- else -}}
{{- printf "%s:%s" .repository (default $.appVersion .tag) -}}
{{- end -}}
{{- end -}}

{{- /* The relay's volumes: its config directory and, beside it (a sibling, not nested in the
read-only config volume), the operator's TLS bundle. runtime.yaml names the bundle relative to
the config directory, so the same files work wherever the volumes are mounted. */ -}}
{{- define "mailrelay.configDir" -}}/etc/mailrelay/config{{- end -}}
{{- define "mailrelay.tlsMount" -}}/etc/mailrelay/tls{{- end -}}

{{- /* The relay Service settings handed to the operator (operator-config.yaml). */ -}}
{{- define "mailrelay.relayServiceConfig" -}}
{{- $s := .Values.service -}}
{{- $annotations := deepCopy $s.annotations -}}
{{- if $s.proxyProtocol.enabled -}}{{- $annotations = merge $annotations $s.proxyProtocol.annotations -}}{{- end -}}
name: {{ .Release.Name }}-relay
type: {{ $s.type }}
{{- if ne $s.type "ClusterIP" }}
externalTrafficPolicy: {{ $s.externalTrafficPolicy }}
{{- end }}
annotations: {{ toJson $annotations }}
labels: {{ toJson $s.labels }}
loadBalancerSourceRanges: {{ toJson $s.loadBalancerSourceRanges }}
{{- with $s.loadBalancerClass }}
loadBalancerClass: {{ . }}
{{- end }}
selector: {{ toJson (fromYaml (include "mailrelay.relaySelector" .)) }}
listenPortOffset: {{ .Values.relay.listenPortOffset }}
proxyProtocol:
  enabled: {{ $s.proxyProtocol.enabled }}
  {{- if $s.proxyProtocol.trustedProxies }}
  trustedProxiesGroup: {{ .Release.Name }}-load-balancers
  {{- end }}
{{- end -}}
