# Sourced by the scripts here: where the API server is built, where a running one keeps its state.
R=${MAILRELAY_APISERVER_DIR:-$HOME/.cache/mailrelay-apiserver}
RUN=${MAILRELAY_APISERVER_RUN:-$R/run}
PORT=${MAILRELAY_APISERVER_PORT:-16443}
# etcd client, peer and metrics ports; off the defaults so a developer's own etcd is not disturbed.
ETCD_PORT=${MAILRELAY_ETCD_PORT:-12379}
export R RUN PORT ETCD_PORT
