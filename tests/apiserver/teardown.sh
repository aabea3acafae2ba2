#!/bin/bash
# Stops the API server and etcd started by setup.sh (the build stays cached).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
"$HERE/ctl.sh" down
