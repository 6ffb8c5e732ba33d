#!/bin/sh
# Write the stack's env files from their .example files with fresh random secrets, so that
# the values that must match (the gateway's MQTT password, the InfluxDB token) do.
# Existing files are kept: delete one to make it again. Files are mode 600.
# Usage: deploy/make-env.sh [DIRECTORY]   (default: the directory of this script)
set -eu

dir="${1:-$(dirname "$0")}"
src="$(dirname "$0")"
umask 077

secret() {
    # 32 random bytes, URL-safe base64 without padding: no ':' (Mosquitto) and no '='.
    head -c 32 /dev/urandom | base64 | tr -d '\n=' | tr '+/' '-_'
}

gateway_pw="$(secret)"
ingest_pw="$(secret)"
dashboard_pw="$(secret)"
technician_pw="$(secret)"
influx_pw="$(secret)"
influx_token="$(secret)"
grafana_pw="$(secret)"

write() { # write EXAMPLE TARGET: fill in the change-me values
    if [ -e "$2" ]; then
        echo "make-env.sh: keeping $2"
        return
    fi
    mkdir -p "$(dirname "$2")"
    sed -e "s|=change-me-gateway\$|=$gateway_pw|" \
        -e "s|=change-me-ingest\$|=$ingest_pw|" \
        -e "s|=change-me-dashboard\$|=$dashboard_pw|" \
        -e "s|=change-me-technician\$|=$technician_pw|" \
        -e "s|=change-me-influx-admin-password\$|=$influx_pw|" \
        -e "s|=change-me-influx-token\$|=$influx_token|" \
        -e "s|=change-me-grafana-admin\$|=$grafana_pw|" \
        "$1" >"$2"
    chmod 600 "$2"
    echo "make-env.sh: wrote $2"
}

write "$src/influxdb.env.example" "$dir/influxdb.env"
write "$src/pumpgw.env.example" "$dir/pumpgw.env"
write "$src/ingest.env.example" "$dir/ingest.env"
write "$src/grafana.env.example" "$dir/grafana.env"
write "$src/mosquitto/users.env.example" "$dir/mosquitto/users.env"
echo "make-env.sh: the dashboard's and technician's MQTT passwords are in $dir/mosquitto/users.env"
