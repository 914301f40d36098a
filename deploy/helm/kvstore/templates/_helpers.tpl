{{/*
Helpers for the kvstore chart. Every define is namespaced `kvstore.`.
*/}}

{{/* kvstore.name: the chart name, or nameOverride; 63 chars max (DNS label). */}}
{{- define "kvstore.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* kvstore.fullname: <release>-<name>, or fullnameOverride. Kept to 52 chars so
"<fullname>-headless" and the pod names "<fullname>-<ordinal>" stay valid labels. */}}
{{- define "kvstore.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 52 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* kvstore.chart: chart name and version, for the helm.sh/chart label. */}}
{{- define "kvstore.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* kvstore.selectorLabels: the immutable labels that select the node pods. */}}
{{- define "kvstore.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kvstore.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: node
{{- end -}}

{{/* kvstore.labels: the app.kubernetes.io/* labels every resource carries. */}}
{{- define "kvstore.labels" -}}
helm.sh/chart: {{ include "kvstore.chart" . }}
{{ include "kvstore.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kvstore
{{- end -}}

{{/* kvstore.headlessServiceName: the headless Service that gives each pod its stable DNS name. */}}
{{- define "kvstore.headlessServiceName" -}}
{{- printf "%s-headless" (include "kvstore.fullname" .) -}}
{{- end -}}

{{/* kvstore.serviceAccountName: the ServiceAccount the pods run as. */}}
{{- define "kvstore.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "kvstore.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* kvstore.secretName: the Secret holding the cluster token (given or chart-made). */}}
{{- define "kvstore.secretName" -}}
{{- default (include "kvstore.fullname" .) .Values.clusterToken.existingSecret -}}
{{- end -}}

{{/* kvstore.clusterToken: the token for the chart-made Secret: clusterToken.value if given, else the
token already stored in the release's Secret (lookup, so upgrades keep it), else a new random one.
Offline (helm template, --dry-run) lookup finds nothing and a new token is drawn. */}}
{{- define "kvstore.clusterToken" -}}
{{- if .Values.clusterToken.value -}}
{{- .Values.clusterToken.value -}}
{{- else -}}
{{- $existing := lookup "v1" "Secret" .Release.Namespace (include "kvstore.secretName" .) -}}
{{- $stored := "" -}}
{{- if and $existing $existing.data -}}
{{- $stored = index $existing.data .Values.clusterToken.secretKey | default "" -}}
{{- end -}}
{{- if $stored -}}
{{- $stored | b64dec -}}
{{- else -}}
{{- randAlphaNum 32 -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* kvstore.authSecretName: the Secret holding the users file and the admin token (auth.existingSecret, or chart-made <fullname>-auth). */}}
{{- define "kvstore.authSecretName" -}}
{{- default (printf "%s-auth" (include "kvstore.fullname" .)) .Values.auth.existingSecret -}}
{{- end -}}

{{/* kvstore.authFile: KVSTORE_AUTH_FILE, the users file where the auth Secret is mounted. */}}
{{- define "kvstore.authFile" -}}
{{- printf "%s/%s" (trimSuffix "/" .Values.auth.mountPath) .Values.auth.usersFileKey -}}
{{- end -}}

{{/* kvstore.adminToken: the admin token for the chart-made auth Secret, as kvstore.clusterToken: auth.adminToken
if given, else the one stored in the release's auth Secret (lookup: upgrades keep it), else a new random one
(40 alphanumerics, about 238 bits). Included once per render (templates/secret-auth.yaml), so the token and
the hash in the users file beside it always match. */}}
{{- define "kvstore.adminToken" -}}
{{- if .Values.auth.adminToken -}}
{{- .Values.auth.adminToken -}}
{{- else -}}
{{- $existing := lookup "v1" "Secret" .Release.Namespace (include "kvstore.authSecretName" .) -}}
{{- $stored := "" -}}
{{- if and $existing $existing.data -}}
{{- $stored = index $existing.data .Values.auth.tokenKey | default "" -}}
{{- end -}}
{{- if $stored -}}
{{- $stored | b64dec -}}
{{- else -}}
{{- randAlphaNum 40 -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* kvstore.usersFile: the chart-made users file (YAML, the format of `kvstore node --auth-file`) for an admin
token given as .token: the admin user (token_sha256 = sha256 of the token) with the role `admin` (read, write
and admin on every key), plus auth.users and auth.roles. Call with (dict "token" $token "Values" .Values). */}}
{{- define "kvstore.usersFile" -}}
{{- $users := dict .Values.auth.adminUser (dict "token_sha256" (sha256sum .token) "roles" (list "admin")) -}}
{{- $roles := dict "admin" (list (dict "prefix" "" "permissions" (list "read" "write" "admin"))) -}}
{{- $file := dict "users" (merge $users (deepCopy .Values.auth.users)) "roles" (merge $roles (deepCopy .Values.auth.roles)) -}}
{{- toYaml $file -}}
{{- end -}}

{{/* kvstore.clientAuthEnv: env for a client of the nodes inside the cluster (the helm test and backup pods):
KVSTORE_TOKEN, the Bearer token the CLI sends: the admin token with auth.enabled, else the cluster token
(the /admin/ routes accept it when access control is off). */}}
{{- define "kvstore.clientAuthEnv" -}}
- name: KVSTORE_TOKEN
  valueFrom:
    secretKeyRef:
      {{- if .Values.auth.enabled }}
      name: {{ include "kvstore.authSecretName" . }}
      key: {{ .Values.auth.tokenKey }}
      {{- else }}
      name: {{ include "kvstore.secretName" . }}
      key: {{ .Values.clusterToken.secretKey }}
      {{- end }}
{{- end -}}

{{/* kvstore.image: repository:tag, the tag defaulting to the chart's appVersion. */}}
{{- define "kvstore.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* kvstore.dataDir: where the data volume is mounted; the same path is KVSTORE_DATA_DIR. */}}
{{- define "kvstore.dataDir" -}}
{{- .Values.persistence.mountPath -}}
{{- end -}}

{{/* kvstore.scheme: how clients and peers reach the nodes: https with tls.enabled. */}}
{{- define "kvstore.scheme" -}}
{{- ternary "https" "http" .Values.tls.enabled -}}
{{- end -}}

{{/* kvstore.clientUrl: the client Service's in-cluster URL. */}}
{{- define "kvstore.clientUrl" -}}
{{- printf "%s://%s.%s.svc.%s:%d" (include "kvstore.scheme" .) (include "kvstore.fullname" .) .Release.Namespace .Values.clusterDomain (int .Values.service.port) -}}
{{- end -}}

{{/* kvstore.tlsSecretName: the Secret with tls.crt, tls.key and ca.crt (given, or cert-manager's). */}}
{{- define "kvstore.tlsSecretName" -}}
{{- default (printf "%s-tls" (include "kvstore.fullname" .)) .Values.tls.existingSecret -}}
{{- end -}}

{{/* kvstore.tlsDnsNames: every name the node certificate must cover: each pod's headless name
(full and short forms), a wildcard for pods added by scaling, the client Service, localhost. */}}
{{- define "kvstore.tlsDnsNames" -}}
{{- $fullname := include "kvstore.fullname" . -}}
{{- $headless := include "kvstore.headlessServiceName" . -}}
{{- $ns := .Release.Namespace -}}
{{- $domain := .Values.clusterDomain -}}
{{- $names := list -}}
{{- range $i := until (int .Values.replicaCount) -}}
{{- $pod := printf "%s-%d.%s" $fullname $i $headless -}}
{{- $names = append $names (printf "%s.%s.svc.%s" $pod $ns $domain) -}}
{{- $names = append $names (printf "%s.%s.svc" $pod $ns) -}}
{{- $names = append $names $pod -}}
{{- end -}}
{{- $names = append $names (printf "*.%s.%s.svc.%s" $headless $ns $domain) -}}
{{- $names = append $names (printf "%s.%s.svc.%s" $fullname $ns $domain) -}}
{{- $names = append $names (printf "%s.%s.svc" $fullname $ns) -}}
{{- $names = append $names (printf "%s.%s" $fullname $ns) -}}
{{- $names = append $names $fullname -}}
{{- $names = append $names "localhost" -}}
{{- toYaml $names -}}
{{- end -}}

{{/* kvstore.tlsClientEnv: env for a client of the nodes inside the cluster (the helm test and backup pods):
the CA that verifies them, and with tls.clientCertAuth the certificate to present. Use inside
`if .Values.tls.enabled`, as the next two. */}}
{{- define "kvstore.tlsClientEnv" -}}
- name: KVSTORE_CACERT
  value: {{ printf "%s/ca.crt" .Values.tls.mountPath | quote }}
{{- if .Values.tls.clientCertAuth }}
# tls.clientCertAuth: the nodes require a client certificate; present the node certificate (it carries `client auth`).
- name: KVSTORE_CERT
  value: {{ printf "%s/tls.crt" .Values.tls.mountPath | quote }}
- name: KVSTORE_KEY
  value: {{ printf "%s/tls.key" .Values.tls.mountPath | quote }}
{{- end }}
{{- end -}}

{{/* kvstore.tlsVolumeMount and kvstore.tlsVolume: the TLS Secret, read-only, for a pod's container
and its volumes (the nodes and the helm test pod). */}}
{{- define "kvstore.tlsVolumeMount" -}}
- name: tls
  mountPath: {{ .Values.tls.mountPath }}
  readOnly: true
{{- end -}}

{{- define "kvstore.tlsVolume" -}}
- name: tls
  secret:
    secretName: {{ include "kvstore.tlsSecretName" . }}
    # Group-readable: the pods' fsGroup owns it; the key is readable by nothing else.
    defaultMode: 0440
{{- end -}}

{{/* kvstore.clientLabel: the label that lets a pod through the NetworkPolicy as a client. */}}
{{- define "kvstore.clientLabel" -}}
{{- printf "%s-client" (include "kvstore.fullname" .) -}}
{{- end -}}

{{/* kvstore.serviceMonitorEnabled: "true" when a ServiceMonitor is asked for and the cluster serves its API. */}}
{{- define "kvstore.serviceMonitorEnabled" -}}
{{- if and .Values.metrics.serviceMonitor.enabled (.Capabilities.APIVersions.Has "monitoring.coreos.com/v1") -}}
true
{{- end -}}
{{- end -}}

{{/* kvstore.prometheusRuleEnabled: "true" when a PrometheusRule is asked for and the cluster serves its API. */}}
{{- define "kvstore.prometheusRuleEnabled" -}}
{{- if and .Values.metrics.prometheusRule.enabled (.Capabilities.APIVersions.Has "monitoring.coreos.com/v1") -}}
true
{{- end -}}
{{- end -}}

{{/* kvstore.alertSelector: the PromQL label matchers picking this release's series in alert rules. */}}
{{- define "kvstore.alertSelector" -}}
{{- default (printf "namespace=%q" .Release.Namespace) .Values.metrics.prometheusRule.selector -}}
{{- end -}}

{{/* kvstore.mapSize: KVSTORE_MAP_SIZE: mapSize if set, else the volume's size (the real limit), else "" (the app's default). */}}
{{- define "kvstore.mapSize" -}}
{{- if .Values.mapSize -}}
{{- .Values.mapSize -}}
{{- else if .Values.persistence.enabled -}}
{{- .Values.persistence.size -}}
{{- end -}}
{{- end -}}

{{/* kvstore.podAntiAffinity: the affinity for podAntiAffinityPreset soft | hard | none. */}}
{{- define "kvstore.podAntiAffinity" -}}
{{- if eq .Values.podAntiAffinityPreset "hard" -}}
podAntiAffinity:
  requiredDuringSchedulingIgnoredDuringExecution:
    - topologyKey: kubernetes.io/hostname
      labelSelector:
        matchLabels:
          {{- include "kvstore.selectorLabels" . | nindent 10 }}
{{- else if eq .Values.podAntiAffinityPreset "soft" -}}
podAntiAffinity:
  preferredDuringSchedulingIgnoredDuringExecution:
    - weight: 100
      podAffinityTerm:
        topologyKey: kubernetes.io/hostname
        labelSelector:
          matchLabels:
            {{- include "kvstore.selectorLabels" . | nindent 12 }}
{{- end -}}
{{- end -}}

{{/* kvstore.drainDeadlineSeconds: the node's KVSTORE_DRAIN_DEADLINE, what the pod's grace period leaves
after the preStop sleep and a margin for exiting, so the kubelet never kills a hand-off half-way. */}}
{{- define "kvstore.drainDeadlineSeconds" -}}
{{- sub (sub (int .Values.terminationGracePeriodSeconds) (int .Values.lifecycle.preStopSleepSeconds)) (int .Values.lifecycle.drainMarginSeconds) -}}
{{- end -}}

{{/* kvstore.validateValues: fail with a fix-it message on combinations the schema cannot express.
replicationFactor > replicaCount is refused at install/upgrade: the ring would have fewer members
than copies asked for. A later `kubectl scale` below it is not seen by helm; the app then caps the
factor at the ring size until the StatefulSet grows again. */}}
{{- define "kvstore.validateValues" -}}
{{- $errors := list -}}
{{- if gt (int .Values.replicationFactor) (int .Values.replicaCount) -}}
{{- $errors = append $errors (printf "replicationFactor (%d) exceeds replicaCount (%d): every key needs that many distinct pods. Fix: --set replicaCount=%d, or --set replicationFactor=%d. A single-pod dev install wants replicationFactor=1." (int .Values.replicationFactor) (int .Values.replicaCount) (int .Values.replicationFactor) (int .Values.replicaCount)) -}}
{{- end -}}
{{- if and .Values.clusterToken.value .Values.clusterToken.existingSecret -}}
{{- $errors = append $errors "clusterToken.value and clusterToken.existingSecret are both set: the chart would ignore one. Fix: set only one of them." -}}
{{- end -}}
{{- if hasKey .Values.auth "token" -}}
{{- $errors = append $errors "auth.token is the cluster token's old name (chart 0.2.0 renamed it). Fix: --set clusterToken.value=<token> instead (with --reuse-values, also --set auth.token=null)." -}}
{{- end -}}
{{- if hasKey .Values.auth "secretKey" -}}
{{- $errors = append $errors "auth.secretKey is the cluster token's old key setting (chart 0.2.0 renamed it). Fix: --set clusterToken.secretKey=<key> instead (with --reuse-values, also --set auth.secretKey=null); a Secret holding the cluster token goes in clusterToken.existingSecret." -}}
{{- end -}}
{{- if .Values.auth.enabled -}}
{{- if .Values.auth.existingSecret -}}
{{- if or .Values.auth.adminToken .Values.auth.users .Values.auth.roles -}}
{{- $errors = append $errors "auth.existingSecret is set together with auth.adminToken, auth.users or auth.roles: the chart mounts your users file and would ignore them. Fix: put those users in your Secret's file, or drop auth.existingSecret." -}}
{{- end -}}
{{- $given := lookup "v1" "Secret" .Release.Namespace .Values.auth.existingSecret -}}
{{- if and $given (not (hasKey ($given.data | default dict) .Values.auth.usersFileKey)) -}}
{{- $errors = append $errors (printf "auth.existingSecret %s has no key %s: it must hold a users file (README: Access control). Since chart 0.2.0 a Secret with the cluster token goes in clusterToken.existingSecret. Fix: --set clusterToken.existingSecret=%s --set auth.existingSecret=<Secret with a users file>, or --set auth.usersFileKey=<its key>." .Values.auth.existingSecret .Values.auth.usersFileKey .Values.auth.existingSecret) -}}
{{- end -}}
{{- else -}}
{{- if hasKey .Values.auth.users .Values.auth.adminUser -}}
{{- $errors = append $errors (printf "auth.users has a user %s, the name of the chart's admin (auth.adminUser). Fix: rename that user, or --set auth.adminUser=<another name>." .Values.auth.adminUser) -}}
{{- end -}}
{{- if hasKey .Values.auth.roles "admin" -}}
{{- $errors = append $errors "auth.roles defines `admin`, the chart's own role (read, write, admin on every key). Fix: give your role another name." -}}
{{- end -}}
{{- range $name, $user := .Values.auth.users -}}
{{- range $role := $user.roles -}}
{{- if and (ne $role "admin") (not (hasKey $.Values.auth.roles $role)) -}}
{{- $errors = append $errors (printf "auth.users.%s has the role %s, which auth.roles does not define. Fix: add auth.roles.%s, or use admin." $name $role $role) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- else if or .Values.auth.existingSecret .Values.auth.adminToken .Values.auth.users .Values.auth.roles -}}
{{- $errors = append $errors "auth.existingSecret, auth.adminToken, auth.users or auth.roles is set but auth.enabled is false: every client could read and write every key. Fix: --set auth.enabled=true, or drop those values." -}}
{{- end -}}
{{- if eq (int .Values.opsPort) (int .Values.containerPort) -}}
{{- $errors = append $errors (printf "opsPort and containerPort are both %d: the ops listener and the data port need a port each. Fix: --set opsPort=%d." (int .Values.opsPort) (add (int .Values.containerPort) 1)) -}}
{{- end -}}
{{- if and .Values.tls.clientCertAuth (not .Values.tls.enabled) -}}
{{- $errors = append $errors "tls.clientCertAuth needs TLS: client certificates are checked in the TLS handshake. Fix: --set tls.enabled=true (with certificates: tls.certManager.* or tls.existingSecret), or drop tls.clientCertAuth." -}}
{{- end -}}
{{- if and .Values.pdb.create (ge (int .Values.pdb.maxUnavailable) (int .Values.replicationFactor)) (gt (int .Values.replicationFactor) 1) -}}
{{- $errors = append $errors (printf "pdb.maxUnavailable (%d) lets a drain take down every copy of a key (replicationFactor %d). Fix: --set pdb.maxUnavailable=1." (int .Values.pdb.maxUnavailable) (int .Values.replicationFactor)) -}}
{{- end -}}
{{- if and (not .Values.serviceAccount.create) .Values.rbac.create (not .Values.serviceAccount.name) -}}
{{- $errors = append $errors "rbac.create is true but serviceAccount.create is false and serviceAccount.name is empty: the Role would be bound to the namespace's \"default\" ServiceAccount. Fix: --set serviceAccount.name=<existing account>, or --set serviceAccount.create=true." -}}
{{- end -}}
{{- if lt (int (include "kvstore.drainDeadlineSeconds" .)) 1 -}}
{{- $errors = append $errors (printf "terminationGracePeriodSeconds (%d) leaves no time to drain after lifecycle.preStopSleepSeconds (%d) and lifecycle.drainMarginSeconds (%d): a pod leaving on scale-down would be killed before handing off its records. Fix: --set terminationGracePeriodSeconds=%d or more." (int .Values.terminationGracePeriodSeconds) (int .Values.lifecycle.preStopSleepSeconds) (int .Values.lifecycle.drainMarginSeconds) (add (int .Values.lifecycle.preStopSleepSeconds) (int .Values.lifecycle.drainMarginSeconds) 30)) -}}
{{- end -}}
{{- if .Values.tls.enabled -}}
{{- if and .Values.tls.existingSecret .Values.tls.certManager.enabled -}}
{{- $errors = append $errors "tls.existingSecret and tls.certManager.enabled are both set: the chart would mount one and issue the other. Fix: set only one of them." -}}
{{- else if not (or .Values.tls.existingSecret .Values.tls.certManager.enabled) -}}
{{- $errors = append $errors "tls.enabled needs certificates: --set tls.certManager.enabled=true (with tls.certManager.issuerRef.name, or tls.certManager.selfSigned=true), or --set tls.existingSecret=<Secret with tls.crt, tls.key and ca.crt>." -}}
{{- end -}}
{{- if and .Values.tls.certManager.enabled (not .Values.tls.certManager.selfSigned) (not .Values.tls.certManager.issuerRef.name) -}}
{{- $errors = append $errors "tls.certManager.enabled needs an issuer: --set tls.certManager.issuerRef.name=<Issuer> (and issuerRef.kind=ClusterIssuer for a cluster-wide one), or --set tls.certManager.selfSigned=true for a private CA." -}}
{{- end -}}
{{- else if or .Values.tls.certManager.enabled .Values.tls.existingSecret -}}
{{- $errors = append $errors "tls.certManager.enabled or tls.existingSecret is set but tls.enabled is false: the nodes would serve plain HTTP. Fix: --set tls.enabled=true." -}}
{{- end -}}
{{- if $errors -}}
{{- fail (printf "\n\nkvstore: invalid values:\n  - %s\n" (join "\n  - " $errors)) -}}
{{- end -}}
{{- end -}}

{{/* kvstore.backupLabels: the labels of the backup CronJob, its Jobs and pods (not the node selector: no Service picks them up). */}}
{{- define "kvstore.backupLabels" -}}
helm.sh/chart: {{ include "kvstore.chart" . }}
{{ include "kvstore.backupSelectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kvstore
{{- end -}}

{{/* kvstore.backupSelectorLabels: what selects the backup pods (the NetworkPolicy admits them by it). */}}
{{- define "kvstore.backupSelectorLabels" -}}
app.kubernetes.io/name: {{ include "kvstore.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: backup
{{- end -}}

{{/* kvstore.backupClaimName: the claim backups are written into (given, or chart-made). */}}
{{- define "kvstore.backupClaimName" -}}
{{- default (printf "%s-backup" (include "kvstore.fullname" .)) .Values.backup.persistence.existingClaim -}}
{{- end -}}
