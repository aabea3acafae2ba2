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
{{- if .Values.relay.mtaStsPolicy.enabled }}
mtaStsPolicyPort: {{ int .Values.relay.mtaStsPolicy.port }}
{{- end }}
proxyProtocol:
  enabled: {{ $s.proxyProtocol.enabled }}
  {{- if $s.proxyProtocol.trustedProxies }}
  trustedProxiesGroup: {{ .Release.Name }}-load-balancers
  {{- end }}
{{- end -}}

{{- /* The relay image (the StatefulSet's, and the drain Job's: `relay drain` is a subcommand of
the same binary). */ -}}
{{- define "mailrelay.relayImage" -}}
{{- include "mailrelay.image" (merge (dict "appVersion" .Chart.AppVersion) .Values.image.relay) -}}
{{- end -}}

{{- /* delivery.shutdownGraceSeconds of runtime.yaml: the user's, or terminationGracePeriodSeconds
- 10 so the relay stops its deliveries and exits by itself before the kubelet's SIGKILL. Fails the
render when the two cannot agree. */ -}}
{{- define "mailrelay.shutdownGraceSeconds" -}}
{{- $tgps := int .Values.relay.terminationGracePeriodSeconds -}}
{{- $delivery := .Values.relay.runtime.delivery | default dict -}}
{{- if hasKey $delivery "shutdownGraceSeconds" -}}
{{- $grace := int $delivery.shutdownGraceSeconds -}}
{{- if gt (add $grace 5) $tgps -}}
{{- fail (printf "relay.runtime.delivery.shutdownGraceSeconds (%d) must be at most relay.terminationGracePeriodSeconds - 5 (%d): the relay needs those seconds to exit before the kubelet kills it, or deliveries in flight are cut off" $grace (sub $tgps 5)) -}}
{{- end -}}
{{- $grace -}}
{{- else -}}
{{- if lt $tgps 15 -}}
{{- fail (printf "relay.terminationGracePeriodSeconds is %d; it must be at least 15 (the relay's delivery.shutdownGraceSeconds is derived as terminationGracePeriodSeconds - 10), or set relay.runtime.delivery.shutdownGraceSeconds explicitly to at most terminationGracePeriodSeconds - 5" $tgps) -}}
{{- end -}}
{{- sub $tgps 10 -}}
{{- end -}}
{{- end -}}

{{- /* runtime.yaml's relay.runtime values with the derived shutdown grace. */ -}}
{{- define "mailrelay.relayRuntime" -}}
{{- $rt := deepCopy .Values.relay.runtime -}}
{{- $delivery := deepCopy ($rt.delivery | default dict) -}}
{{- $_ := set $delivery "shutdownGraceSeconds" (int (include "mailrelay.shutdownGraceSeconds" .)) -}}
{{- $_ := set $rt "delivery" $delivery -}}
{{- if .Values.relay.mtaStsPolicy.enabled -}}
{{- $_ := set $rt "mtaStsPolicy" (dict "listenAddress" (include "mailrelay.mtaStsListenAddress" .)) -}}
{{- end -}}
{{- toYaml $rt -}}
{{- end -}}

{{- /* host:port of the hand-off listener, on the SMTP listeners' address. */ -}}
{{- define "mailrelay.handoffListenAddress" -}}
{{- include "mailrelay.listenOn" (dict "ip" .Values.relay.runtime.listenAddress "port" .Values.relay.handoff.port) -}}
{{- end -}}

{{- /* host:port of the MTA-STS policy host, on the SMTP listeners' address; its port must not be
one of the relay's other fixed ports. */ -}}
{{- define "mailrelay.mtaStsListenAddress" -}}
{{- $port := int .Values.relay.mtaStsPolicy.port -}}
{{- if or (eq $port (int .Values.relay.metricsPort)) (eq $port (int .Values.relay.handoff.port)) -}}
{{- fail (printf "relay.mtaStsPolicy.port %d is already the relay's metrics or hand-off port" $port) -}}
{{- end -}}
{{- include "mailrelay.listenOn" (dict "ip" .Values.relay.runtime.listenAddress "port" $port) -}}
{{- end -}}

{{- /* "ip:port" for a listener (an IPv6 address in brackets); ip defaults to 0.0.0.0. */ -}}
{{- define "mailrelay.listenOn" -}}
{{- $ip := .ip | default "0.0.0.0" -}}
{{- if contains ":" $ip -}}
{{- printf "[%s]:%d" $ip (int .port) -}}
{{- else -}}
{{- printf "%s:%d" $ip (int .port) -}}
{{- end -}}
{{- end -}}

{{- /* Mount path of the hand-off TLS Secret, in the relay pods and in the drain Jobs. */ -}}
{{- define "mailrelay.handoffMount" -}}/etc/mailrelay/handoff{{- end -}}

{{- /* The spool adoption settings handed to the operator (`operator run --spools-config`). */ -}}
{{- define "mailrelay.spoolsConfig" -}}
{{- $r := .Values.relay -}}
{{- $s := $r.scaleDown -}}
{{- if lt (int $s.retry.maxSeconds) (int $s.retry.initialSeconds) -}}
{{- fail "relay.scaleDown.retry.maxSeconds must not be below relay.scaleDown.retry.initialSeconds" -}}
{{- end -}}
statefulSet: {{ .Release.Name }}-relay
volumeClaimTemplate: spool
pvcRetention: {{ $s.pvcRetention }}
checkSeconds: {{ int $s.checkSeconds }}
retry:
  initialSeconds: {{ int $s.retry.initialSeconds }}
  maxSeconds: {{ int $s.retry.maxSeconds }}
handoffSecret: {{ .Release.Name }}-handoff
relayMetricsPort: {{ int $r.metricsPort }}
drainJob:
  image: {{ include "mailrelay.relayImage" . | toJson }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  imagePullSecrets: {{ toJson .Values.imagePullSecrets }}
  target: {{ .Release.Name }}-relay-headless:{{ int $r.handoff.port }}
  spoolDir: {{ toJson $r.runtime.spoolDir }}
  activeDeadlineSeconds: {{ int $s.drainJob.activeDeadlineSeconds }}
  podSecurityContext: {{ toJson $r.podSecurityContext }}
  securityContext: {{ toJson $r.securityContext }}
  resources: {{ toJson $s.drainJob.resources }}
  tolerations: {{ toJson $r.tolerations }}
  nodeSelector: {{ toJson $r.nodeSelector }}
{{- end -}}
