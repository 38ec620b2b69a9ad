#!/bin/sh
# HEALTHCHECK for the Tandem image: 200 from the service's HTTP health endpoint, else unhealthy.
# The engines answer 503 while loading weights and while draining, so both count as unhealthy.
port="${TANDEM_HEALTH_PORT:-31002}"
path="${TANDEM_HEALTH_PATH:-/health}"
exec curl --fail --silent --show-error --max-time 4 --output /dev/null "http://127.0.0.1:${port}${path}"
